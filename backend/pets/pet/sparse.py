"""CSR storage of per-task sparse matrices at the four linear sites, shared by the sparse PETs.

For each task, layer and site the store keeps a CSR matrix over the site's output rows
(``[N, K]`` in the ``[out, in]`` layout of the shared weight): ``N + 1`` row pointers in an
int64 pool (absolute positions into the index pool), the input-column indices in an int32
pool and, for Diff-Pruning, the values in a pool of the serving dtype. MaskBERT keeps no
values: ``seg_spmm`` reads them from the shared weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..backbone import SITES
from ..batch import Batch
from .base import MODULES, LoadedTask, PetContext
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

    def add(self, slot: int, loaded: LoadedTask,
            coo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
            ) -> None:
        """Store one task's matrices.

        Args:
            coo: (layer, module) -> (out_rows, in_cols, values or None) of that module's
                ``[out_m, in]`` matrix; modules of one site are stacked into the site's rows.
        """
        spec = self.ctx.spec
        offs = torch.zeros(spec.layers, len(SITES), dtype=torch.int64)
        for layer in range(spec.layers):
            for si, site in enumerate(SITES):
                n_out, _ = spec.site_shape(site)
                rows, cols, vals = [], [], []
                for module, (msite, block) in MODULES.items():
                    if msite != site or (layer, module) not in coo:
                        continue
                    r, c, v = coo[(layer, module)]
                    width = n_out // 3 if site == "qkv" else n_out
                    rows.append(r.long() + block * width)
                    cols.append(c.long())
                    if v is not None:
                        vals.append(v)
                r_all = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
                c_all = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
                order = torch.argsort(r_all * spec.ffn * 4 + c_all)
                idx_alloc = self.indices.put(c_all[order].int())
                loaded.allocations.append((self.indices, idx_alloc))
                if self.values is not None:  # values mirror the index pool's positions
                    v_all = torch.cat(vals) if vals else torch.zeros(0)
                    self.values.write_at(idx_alloc.offset, v_all[order], self.indices.capacity)
                    loaded.allocations.append((self.values, idx_alloc))
                counts = torch.bincount(r_all, minlength=n_out)
                rp = torch.zeros(n_out + 1, dtype=torch.int64)
                rp[1:] = torch.cumsum(counts, 0)
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
        return SparsePlan(seg_indptr=batch.seg_indptr,
                          item_seg=segs.to(torch.int32).to(dev, non_blocking=True),
                          rowptr_off=offs.to(dev, non_blocking=True))

    def apply(self, plan: SparsePlan, site: str, layer: int, x: torch.Tensor, y: torch.Tensor,
              dense_w: torch.Tensor | None, alpha: float) -> None:
        offs = plan.rowptr_off[layer, SITES.index(site)]
        kernels.active().seg_spmm(y, x, plan.seg_indptr, plan.item_seg, offs,
                         self.rowptr.data, self.indices.data,
                         None if self.values is None else self.values.data, dense_w, alpha)
