"""CSR storage of per-task sparse matrices at the four linear sites, shared by the sparse PETs.

For each task, layer and site the store keeps a CSR matrix over the site's output rows
(``[N, K]`` in the ``[out, in]`` layout of the shared weight): ``N + 1`` row pointers in an
int64 pool (absolute positions into the index pool), the input-column indices in an int32
pool and, for Diff-Pruning, the values in a pool of the serving dtype. MaskBERT keeps no
values: ``seg_spmm`` reads them from the shared weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backbone import SITES
from ..batch import Batch
from .base import MODULES, LoadedTask, PetContext, PetMethod
from .meta import SlotMeta


@dataclass
class SparsePlan:
    seg_indptr: torch.Tensor  # [S + 1] int32, device (the batch's)
    item_seg: torch.Tensor  # [I] int32, device
    rowptr_off: torch.Tensor  # [L, 4, I] int64, device


class SparseStore:
    """Pools and per-slot row-pointer offsets for one sparse PET type."""

    def __init__(self, ctx: PetContext, with_values: bool) -> None:
        self.ctx = ctx
        self.rowptr = ctx.pool(torch.int64)
        self.indices = ctx.pool(torch.int32)
        self.values = ctx.pool() if with_values else None
        self.rowptr_off = SlotMeta((ctx.spec.layers, len(SITES)), torch.int64)

    def add(
        self,
        slot: int,
        loaded: LoadedTask,
        flat: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Store one task's matrices.

        Args:
            flat: (layer, module) -> (positions, values or None): the non-zeros of that
                module's ``[out_m, in]`` matrix as *sorted* flat positions ``o * in + k``
                (int64) and their values. Modules of one site stack into the site's rows in
                block order, so the site's entries come out sorted by row with no sort here.
        """
        spec = self.ctx.spec
        offs = torch.zeros(spec.layers, len(SITES), dtype=torch.int64)
        for layer in range(spec.layers):
            for si, site in enumerate(SITES):
                n_out, n_in = spec.site_shape(site)
                width = n_out // 3 if site == "qkv" else n_out
                rows, cols, vals = [], [], []
                for module, (msite, block) in MODULES.items():  # block order
                    if msite != site or (layer, module) not in flat:
                        continue
                    pos, v = flat[(layer, module)]
                    rows.append(pos // n_in + block * width)
                    cols.append(pos % n_in)
                    if v is not None:
                        vals.append(v)
                dev = self.ctx.device
                r_all = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=dev)
                c_all = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64, device=dev)
                idx_alloc = self.indices.put(c_all.to(torch.int32))
                loaded.allocations.append((self.indices, idx_alloc))
                if self.values is not None:  # values mirror the index pool's positions
                    v_all = torch.cat(vals) if vals else torch.zeros(0, device=dev)
                    self.values.write_at(idx_alloc.offset, v_all, self.indices.capacity)
                    loaded.mirrored.append((self.values, idx_alloc))
                rp = torch.searchsorted(r_all, torch.arange(n_out + 1, device=dev))
                rp_alloc = self.rowptr.put(rp + idx_alloc.offset)
                loaded.allocations.append((self.rowptr, rp_alloc))
                offs[layer, si] = rp_alloc.offset
        self.rowptr_off[slot] = offs

    def remove(self, slot: int) -> None:
        self.rowptr_off.reset(slot)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> SparsePlan:
        tasks = batch.seg_task_cpu[segs]
        offs = self.rowptr_off[tasks].permute(1, 2, 0).contiguous()  # [L, 4, I]
        dev = self.ctx.device
        return SparsePlan(
            seg_indptr=batch.seg_indptr,
            item_seg=segs.to(torch.int32).to(dev, non_blocking=True),
            rowptr_off=offs.to(dev, non_blocking=True),
        )

    def apply(
        self,
        plan: SparsePlan,
        site: str,
        layer: int,
        x: torch.Tensor,
        y: torch.Tensor,
        dense_w: torch.Tensor | None,
        alpha: float,
    ) -> None:
        offs = plan.rowptr_off[layer, SITES.index(site)]
        self.ctx.ops.seg_spmm(
            y,
            x,
            plan.seg_indptr,
            plan.item_seg,
            offs,
            self.rowptr.data,
            self.indices.data,
            None if self.values is None else self.values.data,
            dense_w,
            alpha,
        )


class SparsePetMethod(PetMethod):
    """The plumbing shared by the PET types that keep a :class:`SparseStore`.

    Subclasses implement ``validate``/``load`` and say where the non-zero values come from
    (:meth:`values_source`).
    """

    with_values: ClassVar[bool]

    def __init__(self, ctx: PetContext) -> None:
        super().__init__(ctx)
        self.store = SparseStore(ctx, with_values=self.with_values)

    def values_source(self, site: str, layer: int) -> tuple[torch.Tensor | None, float]:
        """``(dense_w, alpha)`` for ``seg_spmm``: stored values by default."""
        return None, 1.0

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        self.store.remove(slot)
        super().unload(slot, loaded)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> SparsePlan:
        return self.store.prepare(batch, segs)

    def apply_linear(
        self, plan: SparsePlan, site: str, layer: int, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        dense_w, alpha = self.values_source(site, layer)
        self.store.apply(plan, site, layer, x, y, dense_w, alpha)
