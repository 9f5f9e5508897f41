"""Validate a task against a backbone without a running engine (importers, tools).

:func:`scratch_registry` builds the same :class:`TaskRegistry` the engine uses (slot groups,
heads, every PET method) on any device/dtype; :func:`validate_task` runs the registry's full
validation on CPU, so a writer can refuse a task before anything reaches the store.
"""

from __future__ import annotations

import torch

from .backbone import BackboneWeights
from .registry import TaskRegistry
from .taskstore import TaskManifest


def scratch_registry(
    weights: BackboneWeights, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TaskRegistry:
    """An empty registry over ``weights`` (fp32 CPU weights are used as-is on CPU fp32)."""
    device = torch.device(device)
    dev_w = (
        weights if (device.type == "cpu" and dtype == torch.float32) else weights.to(device, dtype)
    )
    return TaskRegistry.on_backbone(dev_w)


def validate_task(
    weights: BackboneWeights,
    manifest: TaskManifest,
    tensors: dict[str, torch.Tensor],
    *,
    trial_load: bool = False,
) -> None:
    """Raise :class:`~pets.errors.TaskError` unless the engine would accept the task.

    Args:
        weights: the serving backbone (fp32, CPU).
        trial_load: also place the task in a scratch CPU registry (catches load-time errors;
            costs a copy of the task's tensors).
    """
    reg = scratch_registry(weights)
    reg.validate(manifest, tensors)
    if trial_load:
        reg.add(manifest, tensors)
