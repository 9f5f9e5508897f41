"""PetS Fig. 7: multi-task vs single-task throughput of pets (in-process).

As the artifact's ``serving_throughput`` experiment: ``--loaded`` tasks (64) of the paper's
four PET types (``--pet-types``) are registered; for every ``(bs, seq)`` of ``--pairs`` and
task count N of ``--tasks``, ``bs * N`` queries of ``seq`` tokens, each of a random task among
the first N, run as one batch (one engine forward). QPS = queries / median forward time;
the figure normalises it to N = 1 (``bs`` queries of one task) at the same ``(bs, seq)``.
Writes ``fig7.csv`` and ``fig7.png`` to a dated run folder (``clients/bench/results.py``).

    python -m clients.paper fig7
    python -m clients.paper fig7 --model bert-large
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from clients.bench.results import Run, pyplot, start_run
from clients.paper.common import (
    add_common,
    annotate,
    describe,
    load_engine,
    parse_ints,
    parse_pairs,
    parse_types,
    pets_batch,
    random_ids,
    time_forward,
    torch_dtype,
)

# Normalised QPS read off the artifact's V100 reference figure (pets-internals.md §5.4).
PAPER_V100 = {
    (1, 128): {16: 1.72, 32: 1.73, 64: 1.84},
    (2, 64): {16: 1.68, 32: 1.57, 64: 1.72},
    (4, 32): {16: 1.52, 64: 1.69},
}
PAPER = (
    "Fig. 7: 16-64 tasks give ~1.5-1.8x the single-task QPS (V100 1.52-1.84x, 1080Ti up to 1.96x)"
)
TARGET = "issue 19 target: >= 1.5x at 16-64 tasks"


def add_args(ap: argparse.ArgumentParser) -> None:
    add_common(ap)
    ap.add_argument("--tasks", default=None, help="task counts (default 1,16,32,64)")
    ap.add_argument("--pairs", default=None, help="BSxSEQ list (default 1x128,2x64,4x32)")
    ap.add_argument("--loaded", type=int, default=None, help="tasks registered (default 64)")
    ap.add_argument("--pet-types", default="paper", help="paper (default), all, or a list")


def run(args: argparse.Namespace, out: Run) -> dict[str, Any]:
    tasks_grid = parse_ints(args.tasks or ("1,2,4" if args.quick else "1,16,32,64"))
    pairs = parse_pairs(args.pairs or ("1x16,2x8" if args.quick else "1x128,2x64,4x32"))
    if 1 not in tasks_grid:
        tasks_grid = [1, *tasks_grid]
    loaded_n = max(args.loaded or (4 if args.quick else 64), max(tasks_grid))
    loaded = load_engine(args.model, args.device, args.dtype)
    device, dtype = loaded.device, torch_dtype(args.dtype, loaded.device)
    loaded.add_mix(loaded_n, parse_types(args.pet_types), seed=args.seed)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    for bs, seq in pairs:
        base = None
        for n in sorted(tasks_grid):
            q = bs * n
            owner = rng.integers(0, n, size=q).tolist()
            batch = pets_batch(loaded, random_ids(rng, q, seq, loaded.engine.spec.vocab), owner)
            sec = time_forward(loaded, batch, args.warmup, args.iters)
            qps = q / sec
            base = qps if n == 1 else base
            assert base is not None
            rows.append(
                {
                    "bs": bs,
                    "seq_len": seq,
                    "tasks": n,
                    "queries": q,
                    "distinct_tasks": len(set(owner)),
                    "ms_per_batch": round(sec * 1e3, 3),
                    "qps": round(qps, 1),
                    "qps_norm": round(qps / base, 3),
                    "paper_v100_norm": PAPER_V100.get((bs, seq), {}).get(n),
                }
            )
            print(
                f"fig7 bs={bs} seq={seq} tasks={n}: {qps:.1f} q/s ({qps / base:.2f}x)", flush=True
            )
    out.write_csv("fig7.csv", rows)
    multi = [r["qps_norm"] for r in rows if r["tasks"] >= 16] or [
        r["qps_norm"] for r in rows if r["tasks"] == max(tasks_grid)
    ]
    ours = (
        f"{min(multi):.2f}-{max(multi):.2f}x the single-task QPS at "
        f"{'16-64' if any(r['tasks'] >= 16 for r in rows) else max(tasks_grid)} tasks"
    )
    _plot(rows, pairs, sorted(tasks_grid), out, describe(args, device, dtype), ours)
    loaded.close()
    return {"rows": rows, "claim": ours}


def _plot(
    rows: list[dict[str, Any]],
    pairs: list[tuple[int, int]],
    tasks_grid: list[int],
    out: Run,
    title: str,
    ours: str,
) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(pairs) * len(tasks_grid) / 4, 3.8))
    width = 0.8 / len(tasks_grid)
    for j, n in enumerate(tasks_grid):
        xs = np.arange(len(pairs)) + (j - (len(tasks_grid) - 1) / 2) * width
        ys = [
            next(r["qps_norm"] for r in rows if (r["bs"], r["seq_len"], r["tasks"]) == (*p, n))
            for p in pairs
        ]
        ax.bar(xs, ys, width, label=f"{n} task{'s' if n > 1 else ''}")
        ref = [PAPER_V100.get(p, {}).get(n, np.nan) for p in pairs]
        ax.plot(
            xs, ref, "k_", ms=12, mew=2, label="paper V100" if j == len(tasks_grid) - 1 else None
        )
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(pairs)), [f"{{{bs},{seq}}}" for bs, seq in pairs])
    ax.set_xlabel("{batch size per task, sequence length}")
    ax.set_ylabel("QPS / single-task QPS")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Fig. 7: multi-task vs single-task; {title}", fontsize=9)
    annotate(fig, PAPER, f"{ours}  [{TARGET}]")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out.path("fig7.png"), dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_args(ap)
    args = ap.parse_args(argv)
    with start_run("fig7", args.out, params=vars(args)) as out:
        out.update(claim=run(args, out)["claim"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
