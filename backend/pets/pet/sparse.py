"""Storage of per-task sparse matrices at the four linear sites, shared by the sparse PETs.

:class:`SparseStore` keeps, for each task, layer and site, a sparse matrix over the site's
output rows (``[N, K]`` in the ``[out, in]`` layout of the shared weight) in sliced ELL
(:func:`~petops.reference.pack_sliced_ell`, the layout of ``seg_spmm``): ``ceil(N / 32) + 1``
slice pointers in an int64 pool (absolute positions into the index pool), the input-column
indices (padded per 32-row slice to its longest row) in an int16 pool and the values, at the
same positions, in a pool of the serving dtype (Diff-Pruning's deltas; for a MaskBERT index
set, minus the shared weight's values there).
:class:`BitmapStore` keeps a selection of the shared weight's entries as a bit per weight
(``seg_masked_mm``): the form of dense MaskBERT masks, with no values (the kernel reads them
from the shared weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from petops.reference import pack_sliced_ell, sliced_entries, spmm_slices

from ..backbone import SITES
from ..batch import Batch
from .base import LoadedTask, PetContext
from .common import MODULES
from .meta import SlotMeta


@dataclass
class SitePlan:
    """One store's items in a batch: a segment each, and its matrix per layer and site."""

    seg_indptr: torch.Tensor  # [S + 1] int32, device (the batch's)
    item_seg: torch.Tensor  # [I] int32, device
    off: torch.Tensor  # [L, 4, I] int64, device: pool offsets (a store's own meaning)


class SiteStore:
    """A store with one pool offset per task, layer and site (``offsets``, ``fill`` if unset)."""

    def __init__(self, ctx: PetContext, fill: int = 0) -> None:
        self.ctx = ctx
        self.offsets = SlotMeta((ctx.spec.layers, len(SITES)), torch.int64, fill=fill)

    def remove(self, slot: int) -> None:
        self.offsets.reset(slot)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> SitePlan:
        """The plan of segments ``segs`` (CPU indices into the batch)."""
        offs = self.offsets[batch.seg_task_cpu[segs]].permute(1, 2, 0).contiguous()  # [L, 4, I]
        return SitePlan(
            seg_indptr=batch.seg_indptr,
            item_seg=self.ctx.to_device(segs.to(torch.int32)),
            off=self.ctx.to_device(offs),
        )


@dataclass
class SiteMatrix:
    """One task's non-zeros at one layer and site, sized but not yet packed."""

    layer: int
    site: int  # index into SITES
    rows: torch.Tensor  # [nnz] int64 output rows of the site's [N, K] matrix
    cols: torch.Tensor  # [nnz] int64 input columns
    values: torch.Tensor  # [nnz]
    shape: tuple[int, int]  # (N, K)
    entries: int  # sliced-ELL entries, padding included


class SparseStore(SiteStore):
    """Sliced-ELL pools for one sparse PET type; ``offsets`` locate each matrix's slice
    pointers."""

    def __init__(self, ctx: PetContext) -> None:
        super().__init__(ctx)
        self.slice_ptr = ctx.pool(torch.int64)
        self.indices = ctx.pool(torch.int16)
        self.values = ctx.pool()

    def matrices(
        self, flat: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    ) -> list[SiteMatrix]:
        """One task's matrices, one per layer and site, with their sizes.

        Args:
            flat: (layer, module) -> (positions, values): the non-zeros of that module's
                ``[out_m, in]`` matrix as flat positions ``o * in + k`` (int64, each once)
                and their values. Modules of one site stack into the site's rows in block
                order.

        Every size is read in one go: on a GPU one host sync a task, not one a matrix.
        """
        spec = self.ctx.spec
        dev = self.ctx.device
        none = torch.zeros(0, dtype=torch.int64, device=dev)
        out = []
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
                    vals.append(v)
                out.append(
                    SiteMatrix(
                        layer,
                        si,
                        torch.cat(rows) if rows else none,
                        torch.cat(cols) if cols else none,
                        torch.cat(vals) if vals else torch.zeros(0, device=dev),
                        (n_out, n_in),
                        0,
                    )
                )
        sizes = torch.stack(
            [sliced_entries(torch.bincount(m.rows, minlength=m.shape[0])) for m in out]
        ).tolist()
        for m, size in zip(out, sizes, strict=True):
            m.entries = size
        return out

    def task_bytes(self, entries: int) -> int:
        """Pool bytes of a task whose matrices hold ``entries`` entries (padding included):
        a column and a value each, and every matrix's slice pointers."""
        spec = self.ctx.spec
        pointers = spec.layers * sum(spmm_slices(spec.site_shape(s)[0]) + 1 for s in SITES)
        entry = self.indices.data.element_size() + self.values.data.element_size()
        return entries * entry + pointers * self.slice_ptr.data.element_size()

    def add(self, slot: int, loaded: LoadedTask, matrices: list[SiteMatrix]) -> None:
        """Pack and store one task's matrices (:meth:`matrices`)."""
        offs = torch.zeros(self.ctx.spec.layers, len(SITES), dtype=torch.int64)
        for m in matrices:
            sp, idx, v_ell = pack_sliced_ell(
                m.rows, m.cols, m.values, *m.shape, n_entries=m.entries
            )
            assert v_ell is not None
            idx_alloc = self.indices.put(idx)
            loaded.allocations.append((self.indices, idx_alloc))
            self.values.write_at(idx_alloc.offset, v_ell, self.indices.capacity)  # mirrored
            loaded.mirrored.append((self.values, idx_alloc))
            sp_alloc = self.slice_ptr.put(sp + idx_alloc.offset)
            loaded.allocations.append((self.slice_ptr, sp_alloc))
            offs[m.layer, m.site] = sp_alloc.offset
        self.offsets[slot] = offs

    def apply(
        self,
        plan: SitePlan,
        site: str,
        layer: int,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """``y[rows] += x[rows] @ S_i.T`` for every item of ``plan``; x ``[T, K]``, y ``[T, N]``."""
        offs = plan.off[layer, SITES.index(site)]
        self.ctx.ops.seg_spmm(
            y,
            x,
            plan.seg_indptr,
            plan.item_seg,
            offs,
            self.slice_ptr.data,
            self.indices.data,
            self.values.data,
        )


class BitmapStore(SiteStore):
    """Per-task ``[N, K]`` bit selections of each site's shared weight, in one int32 pool.

    A site's bitmap costs ``N * ceil(K / 32)`` words whatever the density; a slot with no
    bitmaps (offset -1) gets no work in ``seg_masked_mm``.
    """

    def __init__(self, ctx: PetContext) -> None:
        super().__init__(ctx, fill=-1)
        self.words = ctx.pool(torch.int32)

    def add(
        self, slot: int, loaded: LoadedTask, selected: Mapping[tuple[int, str], torch.Tensor]
    ) -> None:
        """Store one task's selections.

        Args:
            selected: (layer, module) -> the module's selected weights as int32 words
                ``[out_m * ceil(in / 32)]`` in :func:`~petops.reference.pack_mask_words`'
                layout, for every module of every layer. Modules of one site stack into the
                site's rows in block order (their words concatenate).
        """
        spec = self.ctx.spec
        offs = torch.empty((spec.layers, len(SITES)), dtype=torch.int64)
        for layer in range(spec.layers):
            for si, site in enumerate(SITES):
                blocks = sorted((b, m) for m, (s, b) in MODULES.items() if s == site)
                alloc = self.words.put(torch.cat([selected[(layer, m)] for _, m in blocks]))
                loaded.allocations.append((self.words, alloc))
                offs[layer, si] = alloc.offset
        self.offsets[slot] = offs

    def apply(
        self,
        plan: SitePlan,
        site: str,
        layer: int,
        x: torch.Tensor,
        y: torch.Tensor,
        dense_w: torch.Tensor,
        alpha: float,
    ) -> None:
        self.ctx.ops.seg_masked_mm(
            y,
            x,
            plan.seg_indptr,
            plan.item_seg,
            plan.off[layer, SITES.index(site)],
            self.words.data,
            dense_w,
            alpha,
        )
