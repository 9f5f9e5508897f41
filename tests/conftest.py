"""Shared fixtures: the default backbone, a demo task store, engines over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lifecycle_tasks import expected_outputs, make_versions  # tests/ is on pythonpath

from pets.backbone import default_checkpoint, load_backbone
from pets.cli import DEMO_TASKS
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import write_task

torch.manual_seed(0)

# Extra tasks beyond the demo ones: other heads, ranks, module sets, and activations.
EXTRA_TASKS = [
    (
        "emb_lora_mean",
        "lora",
        HeadConfig("embedding", pooling="mean", normalize=True),
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": [
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
        },
    ),
    ("emb_bitfit_cls", "bitfit", HeadConfig("embedding", pooling="cls"), {}),
    (
        "lora_r32",
        "lora",
        HeadConfig("classification", num_labels=5),
        {"r": 32, "lora_alpha": 16, "target_modules": ["key", "intermediate.dense"]},
    ),
    (
        "adapter_gelu_r8",
        "adapter",
        HeadConfig("classification", num_labels=2),
        {"bottleneck": 8, "activation": "gelu"},
    ),
    ("diff_dense5", "diff_pruning", HeadConfig("classification", num_labels=4), {"density": 0.05}),
]


@pytest.fixture(scope="session")
def backbone():
    return load_backbone(default_checkpoint())


@pytest.fixture(scope="session")
def task_store(tmp_path_factory, backbone) -> Path:
    store = tmp_path_factory.mktemp("store")
    for seed, pet in enumerate(DEMO_TASKS):
        hp = {"bottleneck": 16} if pet == "adapter" else {}
        m, t = random_task(
            backbone,
            f"demo_{pet}",
            pet,
            HeadConfig("classification", num_labels=3),
            seed=seed,
            hparams=hp,
        )
        write_task(store, m, t)
    for seed, (name, pet, head, hp) in enumerate(EXTRA_TASKS, start=100):
        m, t = random_task(backbone, name, pet, head, seed=seed, hparams=hp)
        write_task(store, m, t)
    return store


@pytest.fixture(scope="session")
def engine(task_store) -> Engine:
    eng = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    assert not eng.load_errors, eng.load_errors
    return eng


@pytest.fixture(scope="module")
def versions(backbone: Any) -> list[Any]:
    """The task versions the lifecycle tests register, update and unregister."""
    return make_versions(backbone)


@pytest.fixture(scope="module")
def expected(versions: list[Any], tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Each version's outputs for ``IDS`` from a fresh engine."""
    ref = Engine.from_parameters(
        {"TASK_STORE": str(tmp_path_factory.mktemp("ref")), "REFRESH_MS": "0"}
    )
    try:
        return expected_outputs(ref, versions)
    finally:
        ref.close()
