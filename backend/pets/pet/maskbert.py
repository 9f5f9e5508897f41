"""MaskBERT: a learned binary mask over the shared weights, ``W_task = W * M``.

``X @ (W * M).T = X @ W.T + X @ (W * (M - 1)).T``: the shared GEMM minus a sparse product
over the *masked-out* weights, whose values are read from ``W`` itself. In memory a task is
the index set of its masked-out weights (4 bytes each, no values); on disk it is a bit mask.

Tensors (one per masked module; unmasked modules are simply absent):
    ``encoder.layer.{i}.{module}.weight_mask`` uint8 ``[ceil(out * in / 8)]``: the
        ``[out, in]`` keep-mask flattened row-major and packed 8 per byte, least significant
        bit first (``numpy.packbits(mask.ravel(), bitorder="little")``); 1 keeps a weight.
Biases and LayerNorms stay the backbone's (the method's definition); any are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import TaskError
from .base import MODULES, LoadedTask, check_known, layer_key, register_pet
from .diff_pruning import module_shape
from .sparse import SparsePetMethod

MASK = "weight_mask"


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


@register_pet
class MaskBert(SparsePetMethod):
    name = "maskbert"
    code = 3

    with_values = False

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._shifts = torch.arange(8, dtype=torch.uint8, device=ctx.device)

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
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
        flat = {}
        for i in range(spec.layers):
            for module in MODULES:
                name = layer_key(i, module, MASK)
                if name in tensors:
                    out, inp = module_shape(spec, module)
                    packed = tensors[name].to(self.ctx.device)  # unpack where the pools live
                    bits = (packed[:, None] >> self._shifts) & 1  # [nbytes, 8], LSB first
                    keep = bits.reshape(-1)[: out * inp]
                    flat[(i, module)] = (torch.nonzero(keep == 0).flatten(), None)  # sorted
        self.store.add(slot, loaded, flat)
        return loaded

    def values_source(self, site: str, layer: int) -> tuple[torch.Tensor | None, float]:
        """Masked-out weights come from the shared ``W`` with the sign flipped."""
        return self.ctx.backbone.linear[site][layer], -1.0
