"""Random-init tasks for demos, tests and benchmarks, in the task-store tensor format.

Each PET type generates its own tensors (:meth:`pets.pet.PetMethod.generate`); this module
adds the head and the manifest. The weights are random but sized like real tasks and large
enough to visibly change the backbone's output, so a test that compares against an oracle
cannot pass vacuously.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from .backbone import BackboneWeights
from .heads import HeadConfig
from .pet import get_pet_type, pet_types
from .taskstore import TaskManifest

DEMO_HEAD = HeadConfig("classification", num_labels=3)


def default_options() -> dict[str, dict[str, Any]]:
    """Each PET type's generation defaults, by type name (``pets create --help``)."""
    return {name: dict(cls.default_options) for name, cls in pet_types().items()}


def demo_types() -> tuple[str, ...]:
    """The PET types of the demo store, in ``pet_types()`` order."""
    return tuple(name for name, cls in pet_types().items() if cls.demo_options is not None)


def random_head(w: BackboneWeights, head: HeadConfig, seed: int) -> dict[str, torch.Tensor]:
    if not head.has_classifier:
        return {}
    g = torch.Generator().manual_seed(seed + 7919)
    h = w.spec.hidden
    return {
        "classifier.weight": torch.randn(head.num_labels, h, generator=g) * 0.2,
        "classifier.bias": torch.randn(head.num_labels, generator=g) * 0.1,
    }


def random_task(
    w: BackboneWeights,
    name: str,
    pet_type: str,
    head: HeadConfig,
    seed: int = 0,
    hparams: dict[str, Any] | None = None,
) -> tuple[TaskManifest, dict[str, torch.Tensor]]:
    """A complete random task: manifest + tensors (PET + head).

    Args:
        hparams: generation options of ``pet_type`` over its ``default_options`` (see the
            type's ``generate``); the manifest gets the hyper-parameters they amount to.
    Raises:
        TaskError: ``pet_type`` is not registered.
    """
    cls = get_pet_type(pet_type)
    options = {**cls.default_options, **(hparams or {})}
    stored_hp, tensors = cls.generate(w, options, seed)
    tensors.update(random_head(w, head, seed))
    manifest = TaskManifest(
        name=name,
        pet_type=pet_type,
        hparams=stored_hp,
        head=head,
        backbone_fingerprint=w.spec.fingerprint,
        created=time.time(),
    )
    return manifest, tensors


def demo_tasks(w: BackboneWeights) -> Iterator[tuple[TaskManifest, dict[str, torch.Tensor]]]:
    """The demo store: one ``demo_<type>`` task per :func:`demo_types` type (seed = its
    position), with the type's ``demo_options`` and a 3-label classification head."""
    for seed, pet in enumerate(demo_types()):
        options = get_pet_type(pet).demo_options or {}
        yield random_task(w, f"demo_{pet}", pet, DEMO_HEAD, seed=seed, hparams=options)
