"""CUDA graphs faked on the CPU: a clock, a graph that replays its function into a fixed
output buffer, and a :class:`~pets.graphs.GraphCache` that records such graphs. The engine's
graph path (keys, staging, replay) then runs on a CPU stand-in (tests/test_graphs.py checks
real captures on a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pets.graphs import GraphCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeGraph:
    """Replays ``fn`` into a fixed output buffer, as a CUDA graph would."""

    def __init__(self, fn: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        self.out.copy_(self.fn())
        self.replays += 1


class FakeCache(GraphCache):
    """A GraphCache whose captures take ``capture_s`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, capture_s: float = 0.015, **kw: Any) -> None:
        super().__init__(torch.device("cpu"), **kw)
        self.clock, self.capture_s, self.recorded = clock, capture_s, 0

    def _record(self, fn: Callable[[], torch.Tensor], still_keyed: Callable[[], bool]) -> Any:
        warm = fn()
        self.clock.now += self.capture_s
        self.recorded += 1
        if not still_keyed():
            return warm, None, None
        graph = FakeGraph(fn, torch.empty_like(warm))
        return warm, graph, graph.out

    def _reserved_mib(self) -> float:
        return 0.0
