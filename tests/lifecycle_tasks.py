"""Tiny task versions and response checks shared by the lifecycle tests (engine and server)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from pets.engine import Engine
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import TaskManifest

# Small tasks of several PET types; every version has a 3-label head, so versions can only be
# told apart by their values (a wrong version never passes by shape).
VERSIONS: list[tuple[str, dict[str, Any]]] = [
    ("bitfit", {}),
    ("lora", {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}),
    ("adapter", {"bottleneck": 4}),
    ("diff_pruning", {"density": 0.002}),
    ("lora", {"r": 4, "lora_alpha": 4, "target_modules": ["key"]}),
    ("bitfit", {}),
]
IDS = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], dtype=np.int64)
RTOL, ATOL = 1e-4, 1e-5
Task = tuple[TaskManifest, dict[str, torch.Tensor]]


def make_versions(backbone: Any, seed: int = 500) -> list[Task]:
    head = HeadConfig("classification", num_labels=3)
    return [
        random_task(backbone, "version", pet, head, seed=seed + k, hparams=hp)
        for k, (pet, hp) in enumerate(VERSIONS)
    ]


def named(task: Task, name: str) -> Task:
    return dataclasses.replace(task[0], name=name), task[1]


def expected_outputs(ref: Engine, tasks: list[Task], ids: np.ndarray = IDS) -> list[np.ndarray]:
    """Each task's output for ``ids``, computed by a separate engine (added as ``_ref<k>``)."""
    outs = []
    for k, task in enumerate(tasks):
        m, t = named(task, f"_ref{k}")
        ref.registry.add(m, t)
        (out,) = ref.run([ids[0]], [m.name])
        ref.registry.remove(m.name)
        assert isinstance(out, np.ndarray), out
        outs.append(out[None, :])
    for i in range(len(outs)):  # no vacuous pass: every version answers differently
        for j in range(i + 1, len(outs)):
            assert not np.allclose(outs[i], outs[j], rtol=RTOL, atol=ATOL), (i, j)
    return outs


def which(out: Any, expected: list[np.ndarray], allowed: list[int]) -> int | None:
    """Index in ``allowed`` of the version ``out`` equals, else None."""
    if not isinstance(out, np.ndarray):
        return None
    for k in allowed:
        if out.shape == expected[k].shape and np.allclose(out, expected[k], rtol=RTOL, atol=ATOL):
            return k
    return None


def request(name: str, ids: np.ndarray = IDS) -> dict[str, np.ndarray]:
    return {"TASK": np.array([[name.encode()]], dtype=object), "INPUT_IDS": ids}


def pool_usage(engine: Engine) -> dict[str, int]:
    """``used`` of every SlotGroup / FlatPool reachable from the registry (name -> used)."""
    from pets.tables import FlatPool, SlotGroup

    out: dict[str, int] = {}
    seen: set[int] = set()

    def visit(obj: Any, path: str, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, (SlotGroup, FlatPool)):
            out[path] = obj.used
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{path}[{k}]", depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, type)):
            for k, v in vars(obj).items():
                visit(v, f"{path}.{k}", depth + 1)

    reg = engine.registry
    visit(reg.ctx, "ctx", 0)
    visit(reg.heads, "heads", 0)
    visit(reg.methods, "methods", 0)
    return out
