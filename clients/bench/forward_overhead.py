"""Host overhead of the engine's forward: wall time vs GPU time, CUDA graphs on and off.

For each task mix (backbone-only ``none`` tasks, 64 LoRA tasks, 64 tasks of every PET type)
and each batch shape ``B x L`` (or ``B x LO:HI``: lengths drawn anew for every batch), times
:meth:`pets.engine.Engine.run` (staging, forward, outputs back on the host) in two engines
over the same tasks in one process: CUDA graphs off (eager launches) and on (replayed). GPU
time is the replay of the captured forward alone, timed with CUDA events, so ``wall / gpu``
is what the host adds. Writes
``forward_overhead.csv`` into a dated run folder (clients/bench/results.py).

    python -m clients.bench.forward_overhead --backbone bert-base
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.bench.results import add_out_argument, start_run
from clients.pets_client import parse_lengths, parse_point
from pets.backbone import load_backbone
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task

MIXES = ("backbone", "lora", "mixed")


def _engine(args: argparse.Namespace, graphs: bool, store: Path) -> Engine:
    return Engine.from_parameters(
        {
            "BACKBONE": args.backbone,
            "TASK_STORE": str(store),
            "DTYPE": args.dtype,
            "REFRESH_MS": "0",
            "CUDA_GRAPHS": "1" if graphs else "0",
        },
        device=args.device,
    )


def _register(engines: list[Engine], weights: Any, mix: str, n: int) -> list[str]:
    """``n`` tasks of the mix, registered in every engine; returns their names."""
    types = {"backbone": ["none"], "lora": ["lora"], "mixed": sorted(pet_types())}[mix]
    names = []
    for i in range(n):
        pet = types[i % len(types)]
        name = f"{mix}_{pet}_{i}"
        m, t = random_task(weights, name, pet, HeadConfig("classification", num_labels=2), seed=i)
        for eng in engines:
            eng.registry.add(m, t)
        names.append(name)
    return names


def _wall_ms(fn: Any, iters: int) -> float:
    """Median wall time of ``fn`` (which returns host data, so the GPU work is included)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _replay_ms(engine: Engine, iters: int) -> float:
    """GPU time of the most recently used graph: CUDA-event-timed replays."""
    assert engine.graphs is not None and engine.graphs.graphs, "no graph was captured"
    graph = next(reversed(engine.graphs.graphs.values())).graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _ranged(
    row: dict[str, Any],
    engines: list[Engine],
    names: list[str],
    rng: np.random.Generator,
) -> None:
    """A ``B x LO:HI`` point: every batch draws new lengths (as live traffic does), so no two
    batches are alike; 400 batches, the first 100 a warm-up. Wall time per batch for eager,
    for graphs with one-sequence batches padded to length buckets (the engine's default),
    and for graphs without the buckets (exact shapes only), plus each one's graph counts."""
    b, (lo, hi) = row["batch"], parse_lengths(row["seq_len"])[1]
    batches = [
        (
            [rng.integers(1000, 30000, size=int(n)) for n in rng.integers(lo, hi + 1, b)],
            [names[int(i)] for i in rng.integers(len(names), size=b)],
        )
        for _ in range(400)
    ]
    runs = [("eager", engines[0], False)]
    if len(engines) > 1:
        runs += [("graphs", engines[1], True), ("graphs_exact", engines[1], False)]
    for label, eng, buckets in runs:
        eng.length_buckets = buckets
        if eng.graphs is not None:
            eng.graphs.clear()  # each run captures its own shapes
        before = eng.graphs.summary() if eng.graphs is not None else {}
        for ids, tasks in batches[:100]:
            eng.run(ids, tasks)
        t0 = time.perf_counter()
        for ids, tasks in batches[100:]:
            eng.run(ids, tasks)
        row[f"wall_ms_{label}"] = round((time.perf_counter() - t0) * 1e3 / 300, 3)
        if eng.graphs is not None:
            got = eng.graphs.summary()
            for what in ("captures", "replays"):
                row[f"{label}_{what}"] = got[what] - before[what]
    if len(engines) > 1:
        engines[1].length_buckets = True
        ids, tasks = batches[-1]
        pairs = zip(engines[1].run(ids, tasks), engines[0].run(ids, tasks), strict=True)
        row["max_abs_diff"] = float(max(np.abs(g - e).max() for g, e in pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="bert-base")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument(
        "--shapes",
        default="1x128,8x64,64x64,256x64",
        help="BxL points; BxLO:HI draws every batch's lengths anew (e.g. 1x16:128)",
    )
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--commit", default="", help="recorded when git is not available")
    ap.add_argument(
        "--eager-only",
        action="store_true",
        help="time the eager engine alone (an engine without CUDA graphs, e.g. an older tree)",
    )
    add_out_argument(ap)
    args = ap.parse_args()
    run = start_run("forward_overhead", args.out, params=vars(args))
    store = run.path("empty_store/.keep").parent
    weights = load_backbone(args.backbone)
    rows = []
    rng = np.random.default_rng(0)
    for mix in args.mixes.split(","):
        eager = _engine(args, False, store)
        graphed = None if args.eager_only else _engine(args, True, store)
        engines = [eager] if graphed is None else [eager, graphed]
        names = _register(engines, weights, mix, args.tasks)
        for shape in args.shapes.split(","):
            b, length = parse_point(shape, "--shapes")
            if ":" in length:  # lengths drawn anew for every batch
                ranged: dict[str, Any] = {"mix": mix, "batch": b, "seq_len": length}
                _ranged(ranged, engines, names, rng)
                print(json.dumps(ranged), flush=True)
                rows.append(ranged)
                continue
            ids = [rng.integers(1000, 30000, size=int(length)) for _ in range(b)]
            tasks = [names[i % len(names)] for i in range(b)]
            row: dict[str, Any] = {"mix": mix, "batch": b, "seq_len": int(length)}
            for label, eng in zip(("eager", "graphs"), engines, strict=False):

                def call(e: Engine = eng, i: list[Any] = ids, t: list[str] = tasks) -> Any:
                    return e.run(i, t)

                for _ in range(3):  # warm-up: the second run captures
                    call()
                row[f"wall_ms_{label}"] = round(_wall_ms(call, args.iters), 3)
            if graphed is None:
                row["seq_per_s_eager"] = round(b / row["wall_ms_eager"] * 1e3, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            outs_e, outs_g = eager.run(ids, tasks), graphed.run(ids, tasks)
            pairs = zip(outs_g, outs_e, strict=True)
            row["max_abs_diff"] = float(max(np.abs(g - e).max() for g, e in pairs))
            row["gpu_ms"] = round(_replay_ms(graphed, args.iters), 3)
            row["wall_over_gpu_eager"] = round(row["wall_ms_eager"] / row["gpu_ms"], 3)
            row["wall_over_gpu_graphs"] = round(row["wall_ms_graphs"] / row["gpu_ms"], 3)
            row["seq_per_s_graphs"] = round(b / row["wall_ms_graphs"] * 1e3, 1)
            row.update(graphed.graphs.summary() if graphed.graphs else {})
            print(json.dumps(row), flush=True)
            rows.append(row)
        for eng in engines:
            eng.close()
    store.rmdir()
    run.write_csv("forward_overhead.csv", rows)
    run.finish()


if __name__ == "__main__":
    main()
