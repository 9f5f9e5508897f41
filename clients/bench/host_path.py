"""The engine's host work per request with the device's work taken away.

On a GPU a replayed forward costs the host one launch; what remains of ``Engine.execute``
is host work: decoding, scheduling, planning (or reusing a plan), staging, the graph key,
the capture policy, the answers. This measures that part on any machine, the CPU one
included: the engine runs on the CPU with a staged buffer standing in for the device's
(``Stager(enabled=True)``), a forward that returns zeros at once, and a graph cache whose
captures and replays do nothing more (:class:`FreeGraphs`). An eager forward (a shape not
replayed) costs nothing here either, although on a GPU its launches cost the host a few
milliseconds: ``eager`` counts them. The numbers are the host cost of the serving path, not
a forward's, and the answers are zeros.

Points are ``BxL`` (``B`` one-row requests of ``L`` tokens per execute) or ``BxLO:HI``
(lengths drawn anew per request), over ``--tasks`` tasks of every PET type, each request's
task drawn at random. Prints one JSON line per point and writes ``host_path.csv`` to a
dated run folder (clients/bench/results.py).

    python -m clients.bench.host_path --points 1x16:128,1x128,64x64
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.bench.results import add_out_argument, start_run
from clients.pets_client import parse_lengths, parse_point
from pets.backbone import load_backbone
from pets.engine import Engine
from pets.graphs import GraphCache
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.staging import Stager
from pets.taskgen import random_task
from pets.taskstore import write_task


class _Replay:
    """A captured forward whose replay costs nothing: its output keeps the capture's
    values (the point is the host work around it, never the values)."""

    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


class FreeGraphs(GraphCache):
    """The engine's graph cache with the recording replaced: a capture runs the forward
    once (as the real warm-up does) and keeps its output; replays are free."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(torch.device("cpu"), **kw)

    def _record(
        self, fn: Callable[[], torch.Tensor], still_keyed: Callable[[], bool]
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        warm = fn()
        if not still_keyed():
            return warm, None, None
        return warm, _Replay(), warm.clone()

    def _reserved_mib(self) -> float:
        return 0.0


def _engine(args: argparse.Namespace, store: Path) -> Engine:
    eng = Engine.from_parameters(
        {"BACKBONE": args.backbone, "TASK_STORE": str(store), "REFRESH_MS": "0"},
        device="cpu",
    )
    eng.stager = Stager(torch.device("cpu"), capacity=1 << 20, enabled=True)
    width = eng.encoder.heads.out_width()

    def no_forward(prepared: Any) -> torch.Tensor:
        return torch.zeros(prepared.batch.num_seqs, width)  # classification heads only

    eng.encoder.compute = no_forward  # type: ignore[method-assign]
    eng.graphs = FreeGraphs(max_graphs=args.graph_cache)
    eng.length_buckets = True
    eng.warm_graphs(eng.config.graph_warmup)
    return eng


def _requests(
    names: list[str], point: str, count: int, rng: np.random.Generator
) -> list[list[dict[str, np.ndarray]]]:
    b, length = parse_point(point)
    vals = parse_lengths(length)[1]  # [L] or [LO, HI]
    lo_n, hi_n = vals[0], vals[-1]
    return [
        [
            {
                "TASK": np.array([[names[int(rng.integers(len(names)))].encode()]], dtype=object),
                "INPUT_IDS": rng.integers(
                    1000, 2000, size=(1, int(rng.integers(lo_n, hi_n + 1))), dtype=np.int64
                ),
            }
            for _ in range(b)
        ]
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="bert-tiny")
    ap.add_argument("--tasks", type=int, default=64, help="tasks, PET types in turn")
    ap.add_argument("--points", default="1x16:128,1x128,8x64,64x64")
    ap.add_argument("--executes", type=int, default=600, help="timed executes per point")
    ap.add_argument("--graph-cache", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="write profile.txt (cProfile)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = start_run("host_path", args.out, params=vars(args))
    weights = load_backbone(args.backbone)
    types = sorted(pet_types())
    rows = []
    profile = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="pets-host-") as td:
        store = Path(td) / "store"
        names = []
        for i in range(args.tasks):
            pet = types[i % len(types)]
            m, t = random_task(
                weights, f"t{i}_{pet}", pet, HeadConfig("classification", num_labels=2), seed=i
            )
            write_task(store, m, t)
            names.append(m.name)
        rng = np.random.default_rng(0)
        for point in args.points.split(","):
            eng = _engine(args, store)
            warm = eng.graphs.summary() if eng.graphs else {}
            batches = _requests(names, point, args.executes * 2, rng)
            for reqs in batches[: args.executes]:  # first sightings and captures
                eng.execute(reqs)
            before = eng.graphs.summary() if eng.graphs else {}
            if profile is not None:
                profile.enable()
            t0 = time.perf_counter()
            for reqs in batches[args.executes :]:
                eng.execute(reqs)
            dt = time.perf_counter() - t0
            if profile is not None:
                profile.disable()
            after = eng.graphs.summary() if eng.graphs else {}
            n_req = sum(len(r) for r in batches[args.executes :])
            row = {
                "point": point,
                "backbone": args.backbone,
                "tasks": args.tasks,
                "us_per_execute": round(dt / args.executes * 1e6, 1),
                "us_per_request": round(dt / n_req * 1e6, 1),
                "warmed_graphs": warm.get("captures", 0),
                "replays": after.get("replays", 0) - before.get("replays", 0),
                "eager": after.get("eager", 0) - before.get("eager", 0),
                "captures": after.get("captures", 0) - before.get("captures", 0),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            eng.close()
    run.write_csv("host_path.csv", rows)
    if profile is not None:
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(40)
        run.write_text("profile.txt", buf.getvalue())
    run.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
