"""No PET: the backbone as it is, with the task's own head (PetS's "standard" task).

A linear probe or a plain embedding endpoint; it also gives the scheduler's profiler a task
whose forward contains the shared ops and epilogues and no shadow work (the alpha term).
Tensors: head tensors only.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import LoadedTask, PetMethod, check_known, register_pet


@register_pet
class NoPet(PetMethod):
    name = "none"
    code = 7

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        check_known(tensors, set(), self.name)

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        return LoadedTask()
