"""Timing a Triton candidate's tilings against an op it would replace (CUDA only).

A candidate kernel (``petops.masked_wgmma``, ``petops.epilogue_gemm``) comes with a few
tilings whose speed only a GPU can tell. Each is first checked against the op's output on the
point's data (a wrong tiling is reported and not timed), then timed from a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from clients.bench.bench_ops import graph_time


def gpu_us(fn: Callable[[], object], iters: int) -> float:
    """Device microseconds per call of ``fn``, replayed back to back from a CUDA graph
    (:func:`clients.bench.bench_ops.graph_time`, median of 5)."""
    ms = graph_time(fn, iters, repeats=5)
    if ms is None:
        raise SystemExit("a timed call could not be captured in a CUDA graph")
    return ms * 1000.0


@dataclass
class Tiling:
    """One tiling on one point: its largest error relative to the largest output of the op it
    would replace, and its time (None when the error ruled it out)."""

    config: str
    max_err: float
    us: float | None


def time_tilings(
    configs: Iterable[Any],
    run: Callable[[Any], torch.Tensor],
    want: torch.Tensor,
    iters: int,
    reset: Callable[[], object] | None = None,
    tolerance: float = 1e-2,
) -> list[Tiling]:
    """``run(config)`` returns the candidate's output in ``config``; ``want`` is the op's.
    ``reset`` (an in-place op's output zeroed) runs before each check, not in the timing.
    A tiling off by more than ``tolerance`` of ``want``'s largest value is not timed."""
    out = []
    scale = float(want.abs().max()) or 1.0
    for cfg in configs:
        if reset is not None:
            reset()
        err = float((run(cfg).float() - want.float()).abs().max()) / scale
        us = round(gpu_us(lambda c=cfg: run(c), iters), 2) if err < tolerance else None
        out.append(Tiling(str(cfg), round(err, 6), us))
    return out


def best(tilings: list[Tiling], flop: float, reference_us: float) -> dict[str, Any]:
    """The fastest tiling's columns (``triton_us``, ``triton_config``, ``triton_tflops``,
    ``triton_over_ref``) and the largest error over all of them."""
    row: dict[str, Any] = {"triton_max_err": max(t.max_err for t in tilings)}
    timed = [(t.us, t.config) for t in tilings if t.us is not None]
    if timed:
        us, config = min(timed)
        row |= {
            "triton_us": us,
            "triton_config": config,
            "triton_tflops": round(flop / us / 1e6, 1),
            "triton_over_ref": round(us / reference_us, 3),
        }
    return row
