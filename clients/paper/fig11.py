"""PetS Fig. 11: PET operators on several CUDA streams vs one (in-process).

As the artifact's ``multi_stream`` experiment: ``--loaded`` tasks (128) of the paper's four
PET types; for task count N of ``--tasks`` (128, 64, 32) and length ``seq`` of ``--seqs``
(4..64), one fixed batch of ``--batch`` (128) sequences, each of a random task among the
first N, is timed with the shadow (PET) operators planned per task and launched round-robin
over S CUDA streams (:class:`pets.encoder.ShadowStreams`, the engine's ``SHADOW_STREAMS=S``)
for S in ``--streams`` (32..1), normalised to S = 1, as the paper plots it. Our default,
the grouped operators (one launch per PET type and site, ``SHADOW_STREAMS=0``), is timed
too and shown beside them.

The stream count is switched on one engine between timings (the encoder reads it per
forward), so every setting sees the same tasks and batch. On a CPU there are no streams:
every S >= 1 runs the per-task operators in order on one thread (the output says so).
Writes ``fig11.csv`` and ``fig11.png`` (``clients/bench/results.py``).

    python -m clients.paper fig11
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from clients.bench.results import Run, pyplot, start_run
from clients.paper.common import (
    add_common,
    annotate,
    describe,
    load_engine,
    parse_ints,
    parse_types,
    pets_batch,
    random_ids,
    time_forward,
    torch_dtype,
)
from pets.encoder import ShadowStreams

PAPER = (
    "Fig. 11: 1080Ti: more streams always help (+4..18%); V100: smaller gains, sometimes "
    "losses (0.89-1.15x); streams help long sequences / few tasks, one stream is best for "
    "short sequences / many tasks"
)


class SerialStreams:
    """CPU stand-in for :class:`ShadowStreams`: per-task plans, run in order."""

    plans = staticmethod(ShadowStreams.plans)

    def run(self, active: list[tuple[Any, Any]], fn: Callable[[Any, Any], None]) -> None:
        for method, plan in active:
            fn(method, plan)


def add_args(ap: argparse.ArgumentParser) -> None:
    add_common(ap)
    ap.add_argument("--tasks", default=None, help="task counts (default 128,64,32)")
    ap.add_argument("--seqs", default=None, help="sequence lengths (default 4,8,16,32,64)")
    ap.add_argument("--streams", default=None, help="stream counts (default 32,16,8,4,2,1)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default 128)")
    ap.add_argument("--loaded", type=int, default=None, help="tasks registered (default 128)")
    ap.add_argument("--pet-types", default="paper", help="paper (default), all, or a list")


def run(args: argparse.Namespace, out: Run) -> dict[str, Any]:
    q = args.quick
    tasks_grid = parse_ints(args.tasks or ("8,4" if q else "128,64,32"))
    seqs = parse_ints(args.seqs or ("8" if q else "4,8,16,32,64"))
    streams = parse_ints(args.streams or ("2,1" if q else "32,16,8,4,2,1"))
    if 1 not in streams:
        streams.append(1)
    bs = args.batch or (16 if q else 128)
    loaded = load_engine(args.model, args.device, args.dtype)
    device, dtype = loaded.device, torch_dtype(args.dtype, loaded.device)
    loaded.add_mix(max(args.loaded or (8 if q else 128), *tasks_grid), parse_types(args.pet_types))
    enc = loaded.engine.encoder
    cuda = device.type == "cuda"
    mode = "cuda streams" if cuda else "cpu: every S runs per-task ops in order (no streams)"
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    try:
        for n in tasks_grid:
            for seq in seqs:
                owner = rng.integers(0, n, size=bs).tolist()
                ids = random_ids(rng, bs, seq, loaded.engine.spec.vocab)
                batch = pets_batch(loaded, ids, owner)
                secs: dict[int, float] = {}
                for s in [*streams, 0]:
                    mode_s: Any = None if s == 0 else ShadowStreams(s, device) if cuda else None
                    enc.streams = mode_s if cuda or s == 0 else SerialStreams()  # type: ignore[assignment]
                    secs[s] = time_forward(loaded, batch, args.warmup, args.iters)
                for s, sec in secs.items():
                    rows.append(
                        {
                            "tasks": n,
                            "seq_len": seq,
                            "batch": bs,
                            "distinct_tasks": len(set(owner)),
                            "streams": s,
                            "ops": "grouped" if s == 0 else "per-task",
                            "mode": "grouped" if s == 0 else mode,
                            "ms_per_batch": round(sec * 1e3, 3),
                            "qps": round(bs / sec, 1),
                            "qps_norm_1stream": round(secs[1] / sec, 3),
                        }
                    )
                best = max((s for s in streams), key=lambda s: -secs[s])
                print(
                    f"fig11 tasks={n} seq={seq}: best {best} streams "
                    f"{secs[1] / secs[best]:.2f}x, grouped {secs[1] / secs[0]:.2f}x vs 1 stream",
                    flush=True,
                )
    finally:
        enc.streams = None
    out.write_csv("fig11.csv", rows)
    multi = [r["qps_norm_1stream"] for r in rows if r["streams"] > 1]
    grouped = [r["qps_norm_1stream"] for r in rows if r["streams"] == 0]
    ours = (
        f"streams > 1: {min(multi, default=np.nan):.2f}-{max(multi, default=np.nan):.2f}x of one "
        f"stream ({mode}); grouped ops: {min(grouped):.2f}-{max(grouped):.2f}x"
    )
    _plot(rows, tasks_grid, seqs, [*streams, 0], out, describe(args, device, dtype), ours)
    loaded.close()
    return {"rows": rows, "claim": ours}


def _plot(
    rows: list[dict[str, Any]],
    tasks_grid: list[int],
    seqs: list[int],
    streams: list[int],
    out: Run,
    title: str,
    ours: str,
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(tasks_grid), figsize=(4.4 * len(tasks_grid), 3.8), sharey=True, squeeze=False
    )
    width = 0.8 / len(streams)
    for ax, n in zip(axes[0], tasks_grid, strict=True):
        for j, s in enumerate(streams):
            ys = [
                next(
                    r["qps_norm_1stream"]
                    for r in rows
                    if (r["tasks"], r["seq_len"], r["streams"]) == (n, seq, s)
                )
                for seq in seqs
            ]
            label = "grouped ops" if s == 0 else f"{s} stream{'s' if s > 1 else ''}"
            color = "k" if s == 0 else None
            xs = np.arange(len(seqs)) + (j - (len(streams) - 1) / 2) * width
            ax.bar(xs, ys, width, label=label, color=color)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(seqs)), [f"seq {s}" for s in seqs])
        ax.set_title(f"{n} tasks", fontsize=9)
    axes[0][0].set_ylabel("QPS / one stream")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Fig. 11: PET operators over CUDA streams; {title}", fontsize=9)
    annotate(fig, PAPER, ours)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out.path("fig11.png"), dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_args(ap)
    args = ap.parse_args(argv)
    with start_run("fig11", args.out, params=vars(args)) as out:
        out.update(claim=run(args, out)["claim"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
