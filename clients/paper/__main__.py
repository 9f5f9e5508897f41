"""The PetS paper's evaluation, one command per experiment (docs/paper.md).

    python -m clients.paper fig7|fig8|peft|fig8_online|fig9|fig11|fig12|fig12_online|table5 ...
    python -m clients.paper all [--model bert-base] [--quick] [--no-online]

Every experiment takes ``--model`` (bert-base, bert-large, bert-base-6l, bert-tiny or a
checkpoint folder), ``--device``, ``--dtype``, ``--quick`` (a small grid) and ``--out``, and
writes a dated run folder (manifest, CSV, plot with the paper's claim beside ours).
``fig12`` and ``table5`` run the existing scripts (:mod:`clients.paper.fig12`,
:mod:`clients.paper.table5`) with the real engine on a generated task store; their own
flags follow ``--`` (e.g. ``fig12 -- --stds 4``). ``fig12_online`` serves the policies
through tritonserver with perf_analyzer (:mod:`clients.paper.fig12_online`) over a
generated store; it is not part of ``all`` (about 5 more minutes).

``all`` runs every other experiment in turn, then writes ``summary.csv`` / ``summary.md``
(the paper's claim vs ours, the wall time of each) in a run folder of its own; it includes
``fig8_online`` (tritonserver) when the Triton runtime is installed (``make triton``),
unless ``--no-online``. Its grids are the artifact's defaults, except Fig. 12 with one
repetition per point and Table 5 with a 240 s registration budget, so that it finishes
within 30 minutes on one H100/H200 (bert-base, fp16).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clients.bench.results import REPO_ROOT, start_run
from clients.paper import fig7, fig8, fig8_online, fig9, fig11, fig12, table5
from clients.paper.common import add_common

EXPERIMENTS = ("fig7", "fig8", "peft", "fig8_online", "fig9", "fig11", "fig12", "table5")
PAPER = {
    "fig7": fig7.PAPER,
    "fig8": fig8.PAPER,
    "peft": fig8.PAPER_PEFT,
    "fig8_online": fig8.PAPER,
    "fig9": fig9.PAPER,
    "fig11": fig11.PAPER,
    "fig12": "Fig. 12: CB best for std 1-4 (V100 1.58-1.73x of fixed), alpha-only best at "
    "std 8; every scheduler beats fixed batching",
    "table5": table5.PAPER,
}


def make_store(model: str, n: int, types: tuple[str, ...], seed: int = 1) -> Path:
    """A task store of ``n`` random tasks, types drawn uniformly from ``types`` (weight sets
    reused as :data:`clients.paper.common.VARIANTS` says)."""
    from clients.paper.common import task_weights
    from pets.backbone import load_backbone, resolve_checkpoint
    from pets.taskstore import write_task

    host = load_backbone(resolve_checkpoint(model))
    store = Path(tempfile.mkdtemp(prefix="pets-paper-store-"))
    rng = np.random.default_rng(seed)
    cache: dict[Any, Any] = {}
    for k in range(n):
        pet = types[int(rng.integers(len(types)))]
        write_task(store, *task_weights(host, f"task{k:04d}", pet, k, cache))
    return store


def _newest(root: Path, name: str, since: float) -> Path | None:
    runs = [p for p in root.glob(f"*_{name}*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _fig12_claim(folder: Path | None) -> str:
    if folder is None or not (folder / "fig12.csv").is_file():
        return "no result"
    with (folder / "fig12.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    cb = [float(r["qps_norm"]) for r in rows if r["policy"] == "coordinated"]
    wins: dict[str, int] = {}
    for key in {(r["num_tasks"], r["std"]) for r in rows}:
        point = [r for r in rows if (r["num_tasks"], r["std"]) == key]
        best = max(point, key=lambda r: float(r["qps_norm"]))["policy"]
        wins[best] = wins.get(best, 0) + 1
    return (
        f"coordinated {min(cb):.2f}-{max(cb):.2f}x of fixed; best policy per point: "
        + ", ".join(f"{p} {n}" for p, n in sorted(wins.items(), key=lambda kv: -kv[1]))
    )


def run_fig12(args: argparse.Namespace, extra: list[str]) -> str:
    """Fig. 12 on the real engine (``--executor engine``) over a generated store."""
    tasks = "8,4" if args.quick else "128,64,32"
    store = make_store(args.model, max(int(t) for t in tasks.split(",")), fig12.PETS_TYPES)
    argv = [
        "--executor",
        "engine",
        "--device",
        args.device,
        "--out",
        str(args.out),
        "--param",
        f"BACKBONE={args.model}",
        "--param",
        f"DTYPE={args.dtype}",
        "--param",
        f"TASK_STORE={store}",
        "--param",
        "REFRESH_MS=0",
        "--tasks",
        tasks,
        "--sim-device",
        "cuda" if args.device.startswith("cuda") else "cpu",
    ]
    if args.quick:
        argv += ["--queries", "64", "--stds", "4", "--repeats", "1"]
    elif args.all:
        argv += ["--repeats", "1"]
    t0 = time.time()
    fig12.main(argv + extra)
    return _fig12_claim(_newest(Path(args.out), "fig12", t0))


def run_table5(args: argparse.Namespace, extra: list[str]) -> str:
    argv = [
        "--backbone",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--out",
        str(args.out),
    ]
    if args.quick:
        argv += [
            "--max-tasks",
            "64",
            "--checkpoints",
            "8,64",
            "--batch",
            "8",
            "--seq-len",
            "16",
            "--time-budget",
            "60",
        ]
    else:
        argv += ["--checkpoints", "64,1000,10000,20000"]
        if args.all:
            argv += ["--time-budget", "240"]
    t0 = time.time()
    table5.main(argv + extra)
    folder = _newest(Path(args.out), "table5", t0)
    if folder is None:
        return "no result"
    return str(json.loads((folder / "manifest.json").read_text())["params"].get("claim", ""))


def run_fig12_online(args: argparse.Namespace, extra: list[str]) -> str:
    """Fig. 12 through tritonserver + perf_analyzer, over a generated store."""
    from clients.paper import fig12_online

    n = 8 if args.quick else 128
    store = make_store(args.model, n, fig12.PETS_TYPES)
    argv = [
        "--store",
        str(store),
        "--backbone",
        args.model,
        "--out",
        str(args.out),
        "--tasks",
        "8" if args.quick else "64",
    ]
    if args.device.startswith("cuda"):
        argv.append("--serve-args=--gpu")
    if args.quick:
        argv += ["--interval-ms", "1000", "--concurrency", "8"]
    t0 = time.time()
    fig12_online.main(argv + extra)
    folder = _newest(Path(args.out), "fig12_online", t0)
    if folder is None or not (folder / "fig12_online.csv").is_file():
        return "no result"
    with (folder / "fig12_online.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["qps_norm"]]
    return "served, req/s vs fixed: " + ", ".join(
        f"{r['policy']} {float(r['qps_norm']):.2f}x" for r in rows
    )


def _own(
    name: str, run: Callable[[argparse.Namespace, Any], dict[str, Any]]
) -> Callable[[argparse.Namespace, list[str]], str]:
    """An experiment of this package, run with the shared flags."""

    def go(args: argparse.Namespace, extra: list[str]) -> str:
        if extra:
            raise SystemExit(f"{name}: unexpected arguments {extra}; see `{name} --help`")
        with start_run(name, args.out, params=vars(args)) as out:
            claim = str(run(args, out)["claim"])
            out.update(claim=claim)
        return claim

    return go


ADDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "fig7": fig7.add_args,
    "fig8": fig8.add_args,
    "peft": fig8.add_peft_args,
    "fig8_online": fig8_online.add_args,
    "fig9": fig9.add_args,
    "fig11": fig11.add_args,
    "fig12": add_common,
    "fig12_online": add_common,
    "table5": add_common,
}
RUNNERS: dict[str, Callable[[argparse.Namespace, list[str]], str]] = {
    "fig7": _own("fig7", fig7.run),
    "fig8": _own("fig8", fig8.run),
    "peft": _own("peft_mixed", fig8.run_peft),
    "fig8_online": _own("fig8_online", fig8_online.run),
    "fig9": _own("fig9", fig9.run),
    "fig11": _own("fig11", fig11.run),
    "fig12": run_fig12,
    "fig12_online": run_fig12_online,
    "table5": run_table5,
}


def _parse(name: str, argv: list[str], all_mode: bool) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog=f"python -m clients.paper {name}",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ADDERS[name](ap)
    own, extra = argv, []
    if "--" in argv:
        cut = argv.index("--")
        own, extra = argv[:cut], argv[cut + 1 :]
    args, unknown = ap.parse_known_args(own) if all_mode else (ap.parse_args(own), [])
    args.all = all_mode
    del unknown  # `all` passes the shared flags to every experiment; the rest keep defaults
    return args, extra


def run_all(argv: list[str]) -> int:
    t_all = time.perf_counter()
    results = []
    online = (REPO_ROOT / "build" / "triton" / "env.sh").is_file()
    if "--no-online" in argv:
        argv, online = [a for a in argv if a != "--no-online"], False
    for name in EXPERIMENTS:
        if name == "fig8_online" and not online:
            print("== fig8_online skipped (--no-online, or no Triton runtime: make triton) ==")
            continue
        args, extra = _parse(name, argv, all_mode=True)
        print(f"== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            claim, status = RUNNERS[name](args, extra), "ok"
        except Exception as exc:  # one failed experiment does not stop the others
            claim, status = f"failed: {type(exc).__name__}: {exc}", "failed"
            print(f"{name} failed: {exc!r}", file=sys.stderr, flush=True)
        results.append(
            {
                "experiment": name,
                "status": status,
                "paper": PAPER[name],
                "ours": claim,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(
            f"== {name} {status} in {results[-1]['seconds']} s "
            f"({(time.perf_counter() - t_all) / 60:.1f} min so far) ==",
            flush=True,
        )
    args, _ = _parse("fig7", argv, all_mode=True)
    with start_run("paper_all", args.out, params=vars(args)) as out:
        out.write_csv("summary.csv", results)
        total = time.perf_counter() - t_all
        lines = [
            f"# PetS evaluation: {args.model}, {args.dtype}, {args.device}"
            f"{' (quick grid)' if args.quick else ''}; {total / 60:.1f} min",
            "",
            "| experiment | paper | ours | s |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['experiment']} | {r['paper']} | {r['ours']} | {r['seconds']} |" for r in results
        ]
        out.write_text("summary.md", "\n".join(lines) + "\n")
        out.update(total_s=round(total, 1))
        print("\n".join(lines), flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    if name not in RUNNERS:
        raise SystemExit(f"unknown experiment {name!r}; one of {', '.join(RUNNERS)}, all")
    args, extra = _parse(name, rest, all_mode=False)
    print(RUNNERS[name](args, extra), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
