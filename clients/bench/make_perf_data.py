"""Write a perf_analyzer --input-data JSON for the `pets` model (TASK + INPUT_IDS).

Entries cycle through the tasks; perf_analyzer uses them round-robin, so one JSON gives a
mixed-task, mixed-length stream (triton-python-backend.md §7.1).

  python -m clients.bench.make_perf_data -o var/perf/mixed.json          # 5 demo tasks, L=64
  python -m clients.bench.make_perf_data --lengths 16:128 --entries 500 -o mix.json
  python -m clients.bench.make_perf_data --tasks-from-store var/store64 --length 64 -o t64.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from clients.pets_client import DEMO_TASKS, parse_lengths, random_ids


def store_tasks(store: Path) -> list[str]:
    names = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise SystemExit(f"no task folders in {store}; create a store first (pets demo-store)")
    return names


def make(tasks: list[str], lengths: str, entries: int, seed: int, int32: bool) -> dict:
    kind, vals = parse_lengths(lengths)
    rng = np.random.default_rng(seed)
    name = "INPUT_IDS_INT32" if int32 else "INPUT_IDS"
    data = []
    for i in range(entries):
        n = int(rng.integers(vals[0], vals[1] + 1)) if kind == "uniform" else int(rng.choice(vals))
        ids = random_ids(rng, n)[0]
        data.append(
            {name: {"content": ids.tolist(), "shape": [n]}, "TASK": [tasks[i % len(tasks)]]}
        )
    return {"data": data}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="output JSON path")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tasks", help=f"comma-separated task names (default {','.join(DEMO_TASKS)})")
    g.add_argument("--tasks-from-store", type=Path, help="use every task folder of a task store")
    p.add_argument("--num-tasks", type=int, help="use only the first N tasks")
    p.add_argument("--length", "--lengths", dest="lengths", default="64", help="L | LO:HI | L1,L2")
    p.add_argument("--entries", type=int, help="number of entries (default: max(#tasks, 100))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int32", action="store_true", help="send INPUT_IDS_INT32 instead")
    a = p.parse_args(argv)
    tasks = (
        store_tasks(a.tasks_from_store)
        if a.tasks_from_store
        else (a.tasks.split(",") if a.tasks else list(DEMO_TASKS))
    )
    tasks = tasks[: a.num_tasks] if a.num_tasks else tasks
    entries = a.entries or max(len(tasks), 100)
    doc = make(tasks, a.lengths, entries, a.seed, a.int32)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    print(
        f"wrote {out}: {entries} entries, {len(tasks)} tasks, lengths {a.lengths}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
