"""No PET: the backbone as it is, with the task's own head (PetS's "standard" task).

A linear probe or a plain embedding endpoint; it also gives the scheduler's profiler a task
whose forward contains the shared ops and epilogues and no shadow work (the alpha term).
Tensors: head tensors only. No hyper-parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbone import BackboneWeights
from .base import CostDims, LoadedTask, PetCost, PetMethod, register_pet
from .common import check_known


@register_pet
class NoPet(PetMethod):
    name = "none"
    code = 7
    changes_output = False

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return dict(options), {}

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        return PetCost()  # only the epilogue every task pays

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.Config.from_hparams(hparams)
        check_known(tensors, set(), self.name)

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        return LoadedTask()
