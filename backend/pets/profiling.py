"""Timing the engine: the cost-model profiler's ``measure`` and in-process throughput.

:class:`EngineProbe` registers random probe tasks (named ``__probe_<type>_<i>``, never
written to the store) and times forwards of synthetic batches on the engine's device:

* ``alpha(b, s)``: ``b`` sequences of ``s`` tokens of ``none`` tasks (shared ops and
  epilogues, no shadow work);
* ``alpha_packed(t)``: ``t`` tokens packed as 64-token sequences of ``none`` tasks;
* ``beta(p, b, s)``: one task of PET type ``p`` with ``b`` sequences of ``s`` tokens, minus
  the matching ``alpha`` (the shadow-op time of one segment).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .backbone import BackboneWeights, load_backbone, resolve_checkpoint
from .batch import Batch
from .engine import Engine
from .heads import HeadConfig
from .pet import bare_type, pet_types
from .taskgen import random_task

BARE = bare_type()  # the probe type of alpha ("none"): shared ops and epilogues only


def probe_types() -> tuple[str, ...]:
    """Every registered PET type, the bare one first."""
    return (BARE, *(t for t in pet_types() if t != BARE))


def time_fn(
    fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5
) -> float:
    """Median wall seconds of ``fn`` (device-synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class EngineProbe:
    def __init__(
        self,
        engine: Engine,
        tasks_per_type: int = 1,
        types: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.slots: dict[str, list[int]] = {}
        host = _host_weights(engine)  # random_task builds from host fp32 weights
        for t in probe_types() if types is None else types:
            if t not in engine.registry.methods:
                continue
            for i in range(tasks_per_type):
                m, tensors = random_task(
                    host,
                    f"__probe_{t}_{i}",
                    t,
                    HeadConfig("classification", num_labels=2),
                    seed=seed + i,
                )
                self.slots.setdefault(t, []).append(engine.registry.add(m, tensors).slot)

    def batch(self, pet: str, batch_size: int, seq_len: int, pad_to: int = 0) -> Batch:
        slots = self.slots[pet]
        ids = [
            self.rng.integers(1000, self.engine.spec.vocab, size=seq_len) for _ in range(batch_size)
        ]
        task_slots = [slots[i % len(slots)] for i in range(batch_size)]
        return self.engine.encoder.batch(ids, task_slots, pad_to=pad_to)

    def time_batch(self, batch: Batch) -> float:
        return time_fn(lambda: self.engine.encoder.forward(batch), self.engine.device)

    def measure(self, kind: str, batch_size: int, seq_len: int) -> float:
        """The profiler's ``measure(kind, batch_size, seq_len) -> seconds``."""
        if kind == "alpha_packed":
            n = max(1, batch_size // 64)
            return self.time_batch(self.batch(BARE, n, max(1, batch_size // n)))
        alpha = self.time_batch(self.batch(BARE, batch_size, seq_len))
        if kind == "alpha":
            return alpha
        if kind not in self.slots:
            raise KeyError(f"no probe tasks of PET type {kind!r}")
        one = self.slots[kind][:1]
        saved, self.slots[kind] = self.slots[kind], one
        try:
            total = self.time_batch(self.batch(kind, batch_size, seq_len))
        finally:
            self.slots[kind] = saved
        return max(total - alpha, 0.0)


def _host_weights(engine: Engine) -> BackboneWeights:
    return load_backbone(resolve_checkpoint(engine.config.backbone))
