"""What the paper experiments share: model flags, an engine with N random tasks, inputs,
timing, and the plot annotation that puts the paper's claim beside ours.

Models (``--model``): ``bert-base`` (the artifact's default), ``bert-large``,
``bert-base-6l`` (the paper's 6-layer model), ``bert-tiny`` (CPU tests) or any BACKBONE value
(a checkpoint folder). Synthetic models have random weights, as in the artifact
(:data:`pets.backbone.SYNTHETIC_CONFIGS`).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clients.bench.results import add_out_argument
from pets.backbone import BackboneWeights, load_backbone, resolve_checkpoint
from pets.batch import Batch
from pets.engine import DTYPES, Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.profiling import time_fn
from pets.taskgen import random_task
from pets.taskstore import TaskManifest

# The four PET types of the PetS paper's workloads; "all" = every registered type but none.
PAPER_TYPES = ("maskbert", "diff_pruning", "bitfit", "adapter")
HEAD = HeadConfig("classification", num_labels=2)
# Random weight sets generated per PET type; task k of a type reuses set k % VARIANTS (as
# table5's --variants). Every task still has its own slot and copy of the weights, so timings
# do not change, and a bert-base Diff-Pruning task takes seconds to draw.
VARIANTS = 4
Tensors = dict[str, torch.Tensor]


def task_weights(
    host: BackboneWeights, name: str, pet: str, seed: int, cache: dict[Any, Any] | None = None
) -> tuple[TaskManifest, Tensors]:
    """A random task named ``name``: weight set ``seed % VARIANTS`` of type ``pet``."""
    key = (pet, seed % VARIANTS)
    if cache is None or key not in cache:
        made = random_task(host, name, pet, HEAD, seed=seed % VARIANTS)
        if cache is None:
            return made
        cache[key] = made
    manifest, tensors = cache[key]
    manifest = copy.copy(manifest)
    manifest.name = name
    return manifest, tensors


def all_types() -> tuple[str, ...]:
    return tuple(sorted(t for t in pet_types() if t != "none"))


def parse_types(spec: str) -> tuple[str, ...]:
    """``--pet-types``: ``paper`` (the paper's four), ``all``, or a comma list."""
    if spec == "paper":
        return PAPER_TYPES
    if spec == "all":
        return all_types()
    types = tuple(t for t in spec.split(",") if t)
    unknown = [t for t in types if t not in pet_types()]
    if unknown or not types:
        raise SystemExit(
            f"--pet-types {spec!r}: {unknown or 'empty'} not registered; give 'paper', 'all' "
            f"or a comma list of {sorted(pet_types())}"
        )
    return types


def parse_pairs(spec: str) -> list[tuple[int, int]]:
    """``"1x128,2x64"`` -> ``[(1, 128), (2, 64)]`` (batch size x sequence length)."""
    try:
        pairs = [tuple(int(v) for v in p.split("x")) for p in spec.split(",") if p]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise SystemExit(f"{spec!r}: expected a comma list of BSxSEQ such as 1x128,2x64")
    return [(p[0], p[1]) for p in pairs]


def parse_ints(spec: str) -> list[int]:
    try:
        out = [int(v) for v in spec.split(",") if v]
    except ValueError:
        out = []
    if not out:
        raise SystemExit(f"{spec!r}: expected a comma list of integers such as 2,4,8")
    return out


def add_common(ap: argparse.ArgumentParser) -> None:
    """The flags every experiment takes (the harness passes them through)."""
    ap.add_argument(
        "--model",
        default="bert-base",
        help="bert-base (default, the artifact's), bert-large, bert-base-6l, bert-tiny, "
        "or a checkpoint folder",
    )
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto = float16 on CUDA, float32 on CPU")
    ap.add_argument("--quick", action="store_true", help="a small grid (CI, smoke runs)")
    ap.add_argument("--iters", type=int, default=10, help="timed repetitions (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    add_out_argument(ap)


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass
class Loaded:
    """An engine on a temporary store with random tasks registered in memory."""

    engine: Engine
    host: BackboneWeights  # fp32 host weights the tasks (and any baseline) are built from
    tasks: list[tuple[TaskManifest, Tensors]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def add(self, pet: str, seed: int) -> int:
        """Register one random task of type ``pet`` (weight set ``seed % VARIANTS``);
        returns its index in :attr:`tasks`."""
        name = f"t{len(self.tasks):05d}_{pet}"
        manifest, tensors = task_weights(self.host, name, pet, seed, self.cache)
        self.slots.append(self.engine.registry.add(manifest, tensors).slot)
        self.tasks.append((manifest, tensors))
        return len(self.tasks) - 1

    def add_mix(self, n: int, types: Sequence[str], seed: int = 0) -> None:
        """``n`` tasks, PET types drawn uniformly from ``types`` (seeded), distinct weights."""
        rng = np.random.default_rng(seed)
        for k in range(n):
            self.add(types[int(rng.integers(len(types)))], seed=seed + k)

    def close(self) -> None:
        self.engine.close()


def load_engine(model: str, device: str, dtype: str, **params: str) -> Loaded:
    """An engine for ``model`` with an empty temporary task store (tasks: :meth:`Loaded.add`)."""
    engine = Engine.from_parameters(
        {
            "BACKBONE": model,
            "TASK_STORE": tempfile.mkdtemp(prefix="pets-paper-"),
            "DTYPE": dtype,
            "REFRESH_MS": "0",
            **params,
        },
        device=device,
    )
    return Loaded(engine, load_backbone(resolve_checkpoint(model)))


def random_ids(rng: np.random.Generator, n: int, length: int, vocab: int) -> list[np.ndarray]:
    """``n`` sequences of ``length`` random word-piece ids (no special tokens)."""
    return [rng.integers(1000, max(1001, vocab - 1), size=length) for _ in range(n)]


def pets_batch(loaded: Loaded, ids: Sequence[np.ndarray], task_index: Sequence[int]) -> Batch:
    """One packed engine batch: sequence ``b`` of task ``task_index[b]``."""
    return loaded.engine.encoder.batch(ids, [loaded.slots[k] for k in task_index])


def time_forward(loaded: Loaded, batch: Batch, warmup: int, iters: int) -> float:
    """Median seconds of one eager engine forward of ``batch`` (device-synchronised)."""
    enc = loaded.engine.encoder
    return time_fn(lambda: enc.forward(batch), loaded.device, warmup=warmup, repeat=iters)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    return time_fn(fn, device, warmup=warmup, repeat=iters)


def annotate(fig: Any, paper: str, ours: str) -> None:
    """The paper's claim beside ours, under the plot."""
    fig.text(0.01, 0.01, f"paper: {paper}\nours: {ours}", fontsize=7, va="bottom", wrap=True)


def describe(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    return f"{args.model} {str(dtype).removeprefix('torch.')} on {device_name(device)}"
