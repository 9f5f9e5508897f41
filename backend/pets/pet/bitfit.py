"""BitFit: per-task biases (and LayerNorm parameters), no extra matmul.

Tensors: any subset of the backbone's bias and LayerNorm tensors, named as in ``BertModel``
(``encoder.layer.{i}.attention.self.query.bias``, ``...output.LayerNorm.weight``, ...).
Missing ones keep the backbone's values. The shadow work is only the epilogue's bias/LN row
lookup, which every task pays anyway. No hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..backbone import BackboneWeights
from ..errors import TaskError
from .base import CostDims, LoadedTask, PetCost, PetMethod, register_pet
from .common import alloc_bias_ln, bias_names, check_bias_ln, check_known, ln_names, random_bias_ln


@register_pet
class BitFit(PetMethod):
    name = "bitfit"
    code = 1
    imports_finetuned = True
    demo_options: ClassVar[dict[str, Any] | None] = {}

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Every bias and LayerNorm of the backbone plus ``N(0, 0.1)`` noise."""
        g = torch.Generator().manual_seed(seed)
        hparams = {k: v for k, v in options.items() if k != "density"}
        return hparams, random_bias_ln(weights, g, 0.1)

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        return PetCost()  # its rows replace the shared ones in the epilogue: no extra work

    @classmethod
    def from_weight_deltas(
        cls, deltas: Iterable[tuple[int, str, torch.Tensor]], density: float
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
        """Nothing of the weights: their changes are dropped, with a warning saying how big."""
        dropped = max((float(d.abs().max()) for _, _, d in deltas), default=0.0)
        warnings = []
        if dropped > 0:
            warnings.append(
                f"bitfit keeps biases, LayerNorms and the head only: linear weight "
                f"changes up to {dropped:.3g} (max |W_ft - W|) are dropped"
            )
        return {}, {}, warnings

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.Config.from_hparams(hparams)
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
