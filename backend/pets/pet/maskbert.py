"""MaskBERT: a learned binary mask over the shared weights, ``W_task = W * M``.

In memory a task takes one of two forms (``MASKBERT_FORMAT``: ``index`` or ``bitmask`` forces
one; ``csr``, the old name of ``index``, is still accepted):

* ``index``: the *masked-out* index set with the shared weight's values there, copied at
  registration (sliced ELL, padded per 32-row slice to its longest row: ``seg_spmm``), 4 bytes
  per masked-out weight in fp16. Its tokens take the shared GEMM, and
  ``X @ (W * (1 - M)).T`` is subtracted by ``seg_spmm``, whose cost grows with the density;
  smaller below about 2% density in fp16 (1.2% in fp32).
* ``bitmask``: the *kept* weights, one bit per weight of every site. Its tokens skip the
  shared GEMMs (:attr:`LoadedTask.owns_linear`: the batch puts them last) and
  ``X @ (W * M).T`` is computed once by ``seg_masked_mm`` (on CUDA a tensor-core product that
  masks the shared weight on the fly, whose cost does not depend on the density).

``auto`` (the default) takes the smaller form, on CUDA and CPU alike. On the CPU the bit mask
was slower while it was a second product beside the shared GEMM (the CPU kernel expands each
task's masked weight on every call); as the one product it was the faster form at 5% density
(``docs/results/2026-12-07_cpu_maskbert_one_product``).

On disk a task is always a bit mask.

Tensors (one per masked module; unmasked modules are simply absent):
    ``encoder.layer.{i}.{module}.weight_mask`` uint8 ``[ceil(out * in / 8)]``: the
        ``[out, in]`` keep-mask flattened row-major and packed 8 per byte, least significant
        bit first (``numpy.packbits(mask.ravel(), bitorder="little")``); 1 keeps a weight.
Biases and LayerNorms stay the backbone's (the method's definition); any are refused.
No hyper-parameters. :meth:`generate` takes ``density`` (default 0.05), the share of weights a
random task masks out.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any, ClassVar

import numpy as np
import torch

from petops.reference import pack_mask_words

from ..backbone import SITES, BackboneSpec, BackboneWeights
from ..batch import Batch
from ..errors import TaskError
from .base import CostDims, LoadedTask, PetContext, PetCost, PetMethod, register_pet
from .common import MODULES, check_known, layer_key, module_shape
from .meta import SlotMeta
from .sparse import BitmapStore, SiteMatrix, SitePlan, SparseStore

MASK = "weight_mask"
FORMATS = ("auto", "index", "bitmask")  # MASKBERT_FORMAT, checked by EngineConfig
FORMAT_ALIASES = {"csr": "index"}  # the index form's name before it was sliced ELL
COST_DENSITY = 0.05  # a typical task's share of masked-out weights, for the cost model


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` bool keep-mask -> packed uint8 ``[ceil(out * in / 8)]``."""
    return torch.from_numpy(
        np.packbits(keep.reshape(-1).numpy().astype(np.uint8), bitorder="little")
    )


def unpack_mask(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: packed uint8 -> ``[out, in]`` bool keep-mask."""
    n = shape[0] * shape[1]
    flat = np.unpackbits(bits.numpy(), count=n, bitorder="little")
    return torch.from_numpy(flat.astype(bool)).reshape(shape)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`unpack_mask` in torch, on ``packed``'s device: bool ``[out, in]``, 1 keeps."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1  # [nbytes, 8], least significant first
    return (bits.reshape(-1)[: shape[0] * shape[1]] == 1).view(shape)


def set_bits(packed: torch.Tensor) -> torch.Tensor:
    """How many bits of a uint8 tensor are set: int64 ``[]`` on its device (bitwise on the
    bytes, no wider temporaries)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return ((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64)


def mask_words_shape(spec: BackboneSpec, module: str) -> tuple[int]:
    """The shape of a module's mask as ``seg_masked_mm`` words: ``(out * ceil(in / 32),)``."""
    out, inp = module_shape(spec, module)
    return (out * ((inp + 31) // 32),)


def keep_words(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A packed ``[out, in]`` keep-mask (bits past ``out * in`` clear) as ``seg_masked_mm``'s
    int32 words ``[out * ceil(in / 32)]`` (:func:`~petops.reference.pack_mask_words`), on
    ``packed``'s device. Where rows fill whole words (every BERT width) the stored bytes, read
    little-endian, already are those words: one copy, nothing unpacked."""
    out, inp = shape
    if inp % 32 == 0 and sys.byteorder == "little":
        words = torch.empty(out * inp // 32, dtype=torch.int32, device=packed.device)
        words.view(torch.uint8).copy_(packed)
        return words
    return pack_mask_words(unpack_bits(packed, shape))


@register_pet
class MaskBert(PetMethod):
    name = "maskbert"
    code = 3
    default_options: ClassVar[dict[str, Any]] = {"density": 0.05}  # share of weights masked out
    demo_options: ClassVar[dict[str, Any] | None] = {}

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A mask over every linear that drops each weight with probability ``density``."""
        spec = weights.spec
        rng = np.random.default_rng(seed)
        t = {}
        for i in range(spec.layers):
            for m in MODULES:
                out, inp = module_shape(spec, m)
                keep = torch.from_numpy(
                    rng.random((out, inp), dtype=np.float32) >= options.get("density", 0.05)
                )
                t[layer_key(i, m, MASK)] = pack_mask(keep)
        return {k: v for k, v in options.items() if k != "density"}, t

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        """``2·0.05·(4H² + 2HF)`` FLOPs (the masked-out 5%) at sparse efficiency."""
        return PetCost(flops=2.0 * COST_DENSITY * dims.linear_weights / dims.sparse_efficiency)

    def __init__(self, ctx: PetContext) -> None:
        super().__init__(ctx)
        self.store = SparseStore(ctx)
        self.bitmaps = BitmapStore(ctx)
        self.is_bitmap = SlotMeta((), torch.bool, fill=False)  # per slot: which store holds it

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.Config.from_hparams(hparams)
        spec = self.ctx.spec
        names = {layer_key(i, m, MASK): m for i in range(spec.layers) for m in MODULES}
        check_known(tensors, set(names), self.name)
        if not tensors:
            raise TaskError(
                "maskbert task carries no weight_mask tensor; it would equal the backbone"
            )
        for name, t in tensors.items():
            out, inp = module_shape(spec, names[name])
            want = (out * inp + 7) // 8
            if t.dtype != torch.uint8 or tuple(t.shape) != (want,):
                raise TaskError(
                    f"tensor {name!r} must be a packed uint8 bit mask of shape "
                    f"({want},) for a [{out}, {inp}] weight, got {t.dtype} "
                    f"{tuple(t.shape)}"
                )

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        spec = self.ctx.spec
        loaded = LoadedTask()
        packed: dict[tuple[int, str], torch.Tensor] = {}  # keep-masks as stored, uint8
        for i in range(spec.layers):
            for module in MODULES:
                name = layer_key(i, module, MASK)
                if name in tensors:  # work where the pools live
                    out, inp = module_shape(spec, module)
                    packed[(i, module)] = self._clear_padding(tensors[name], out * inp)
        as_bitmap, matrices = self._choose_form(packed)
        self.is_bitmap[slot] = as_bitmap
        loaded.form = "bitmask" if as_bitmap else "index"
        if matrices is not None:
            self.store.add(slot, loaded, matrices)
        else:  # the kept weights of every module (an unmasked one keeps all)
            dev = self.ctx.device
            kept = {
                (i, m): keep_words(packed[(i, m)], module_shape(spec, m))
                if (i, m) in packed
                else torch.full(mask_words_shape(spec, m), -1, dtype=torch.int32, device=dev)
                for i in range(spec.layers)
                for m in MODULES
            }
            self.bitmaps.add(slot, loaded, kept)
            loaded.owns_linear = True
        return loaded

    def _clear_padding(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """``packed`` on the device with the bits past the ``n`` weights cleared."""
        packed = packed.to(self.ctx.device)
        if n % 8:
            packed = packed.clone()
            packed[-1] &= (1 << (n % 8)) - 1
        return packed

    def _choose_form(
        self, packed: dict[tuple[int, str], torch.Tensor]
    ) -> tuple[bool, list[SiteMatrix] | None]:
        """The bit-mask form (forced, or smaller than the index set), or the index set's
        matrices to store."""
        if self.ctx.maskbert_format == "bitmask":
            return True, None
        if self.ctx.maskbert_format == "index":
            return False, self._index_matrices(packed)
        spec = self.ctx.spec
        bitmap = spec.layers * sum(  # every site: the bit mask replaces the shared GEMM
            4 * n * ((k + 31) // 32) for n, k in (spec.site_shape(s) for s in SITES)
        )
        kept = int(sum(set_bits(p) for p in packed.values())) if packed else 0  # one sync
        masked = sum(int(np.prod(module_shape(spec, m))) for _, m in packed) - kept
        if bitmap < self.store.task_bytes(masked):  # below the index set before its padding
            return True, None
        matrices = self._index_matrices(packed)
        if bitmap < self.store.task_bytes(sum(m.entries for m in matrices)):
            return True, None
        return False, matrices

    def _index_matrices(self, packed: dict[tuple[int, str], torch.Tensor]) -> list[SiteMatrix]:
        """The masked-out positions with minus the shared weights there."""
        spec = self.ctx.spec
        flat = {}
        for (i, m), p in packed.items():
            site, block = MODULES[m]
            out, inp = module_shape(spec, m)
            w = self.ctx.backbone.linear[site][i][block * out : (block + 1) * out]
            pos = torch.nonzero(~unpack_bits(p, (out, inp)).reshape(-1)).flatten()
            flat[(i, m)] = (pos, -w.reshape(-1)[pos])
        return self.store.matrices(flat)

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        self.store.remove(slot)
        self.bitmaps.remove(slot)
        self.is_bitmap.reset(slot)
        super().unload(slot, loaded)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> tuple[SitePlan | None, SitePlan | None]:
        as_bitmap = self.is_bitmap[batch.seg_task_cpu[segs]]
        index, bitmap = segs[~as_bitmap], segs[as_bitmap]
        return (
            self.store.prepare(batch, index) if index.numel() else None,
            self.bitmaps.prepare(batch, bitmap) if bitmap.numel() else None,
        )

    def linear_sites(self, plan: tuple[SitePlan | None, SitePlan | None]) -> Collection[str]:
        return SITES  # both forms change every linear's output

    def apply_linear(
        self,
        plan: tuple[SitePlan | None, SitePlan | None],
        site: str,
        layer: int,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        w = self.ctx.backbone.linear[site][layer]
        index, bitmap = plan
        if index is not None:  # minus the masked-out weights (their values copied from W)
            self.store.apply(index, site, layer, x, y)
        if bitmap is not None:  # the whole product over the kept weights (rows start at 0)
            self.bitmaps.apply(bitmap, site, layer, x, y, w, 1.0)
