"""BitFit: per-task biases (and LayerNorm parameters), no extra matmul.

Tensors: any subset of the backbone's bias and LayerNorm tensors, named as in ``BertModel``
(``encoder.layer.{i}.attention.self.query.bias``, ``...output.LayerNorm.weight``, ...).
Missing ones keep the backbone's values. The shadow work is only the epilogue's bias/LN row
lookup, which every task pays anyway.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TaskError
from .base import (
    LoadedTask,
    PetMethod,
    alloc_bias_ln,
    bias_names,
    check_bias_ln,
    check_known,
    ln_names,
    register_pet,
)


@register_pet
class BitFit(PetMethod):
    name = "bitfit"
    code = 1

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        spec = self.ctx.spec
        check_known(tensors, set(bias_names(spec)) | set(ln_names(spec)), self.name)
        if not tensors:
            raise TaskError(
                "bitfit task carries no bias or LayerNorm tensor; it would equal the "
                "backbone. Export at least one bias"
            )
        check_bias_ln(spec, tensors)

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        loaded = LoadedTask()
        alloc_bias_ln(self.ctx, tensors, loaded)
        return loaded
