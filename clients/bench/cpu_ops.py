"""Per-call time of the compiled CPU petops kernels on the shapes a served batch gives them.

The op arguments come from the real engine: for each case ``BACKBONE:BxL`` a CPU
:class:`pets.engine.Engine` gets ``--tasks-per-type`` random tasks of every PET type
(:func:`pets.taskgen.random_task`), runs ``B`` requests of ``L`` tokens round-robin over the
tasks, and every ``petops`` call of the second execute is recorded (a second engine with
``MASKBERT_FORMAT=bitmask`` adds the ``seg_masked_mm`` calls). Calls are grouped by op and
shape (``calls`` = how many of them one execute makes); each group is timed call by call, the
in-place ops' ``y`` restored between calls outside the clock, at each ``--threads`` setting.

Timing runs in a child process per library (``--library LABEL=PATH``, repeatable) that loads
it with ``torch.ops.load_library`` and nothing else of petops, so a base commit's build can be
compared with this tree's in one run. Each group's first output is kept and compared with the
first library's (``max_abs_diff``). ``--rounds`` alternates the libraries and keeps each
group's fastest median, which steadies numbers on a shared machine. Writes ``cpu_ops.csv``
(one row per case, threads, group and library; ``op=total`` sums a whole execute's calls) to
a dated run folder (clients/bench/results.py) and prints a table.

    python -m clients.bench.cpu_ops                                   # served bert-tiny batch
    python -m clients.bench.cpu_ops --cases bert-tiny:16x16,default:128x16 --rounds 3 \\
        --library base=/tmp/base/libpetops.so --library this=build/out/libpetops.so
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clients.bench.results import REPO_ROOT, add_out_argument, start_run

DEFAULT_LIBRARY = REPO_ROOT / "build" / "out" / "libpetops.so"
DEFAULT_CASES = "bert-tiny:16x16,default:128x16"
INPLACE = frozenset({"sgmv_expand", "seg_spmm", "seg_masked_mm"})  # accumulate into args[0]
FIELDS = [
    "case",
    "tokens",
    "hidden",
    "threads",
    "op",
    "call",
    "calls",
    "library",
    "median_us",
    "p90_us",
    "per_execute_us",
    "speedup_vs_first",
    "max_abs_diff",
]


@dataclass(frozen=True)
class Case:
    """One served batch: ``batch`` requests of ``length`` tokens on ``backbone``."""

    backbone: str
    batch: int
    length: int

    @property
    def name(self) -> str:
        return f"{self.backbone}:{self.batch}x{self.length}"


def parse_cases(text: str) -> list[Case]:
    """``"bert-tiny:16x16,default:128x16"`` -> cases; ``default`` is all-MiniLM-L6-v2."""
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        backbone, _, shape = item.rpartition(":")
        b, _, length = shape.partition("x")
        if not backbone or not b.isdigit() or not length.isdigit():
            raise SystemExit(f"--cases item {item!r} is not BACKBONE:BxL, e.g. bert-tiny:16x16")
        cases.append(Case(backbone, int(b), int(length)))
    return cases


def parse_libraries(items: Sequence[str] | None) -> list[tuple[str, Path]]:
    """``["base=/tmp/x.so", "this=build/out/libpetops.so"]`` -> labelled existing paths."""
    libs = []
    for item in items or [f"this={DEFAULT_LIBRARY}"]:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--library {item!r} is not LABEL=PATH")
        p = Path(path).resolve()
        if not p.is_file():
            raise SystemExit(f"--library {label}: {p} not found; build it with build/build_ops.sh")
        libs.append((label, p))
    return libs


def _shape(t: Any) -> str:
    return "x".join(str(d) for d in t.shape) if isinstance(t, torch.Tensor) else "-"


def call_key(op: str, args: Sequence[Any]) -> str:
    """What sets a call's cost apart from another call of the same op: shapes, items, act."""
    if op == "bias_act":
        scale = "+scale" if args[4] is not None else ""
        return f"y={_shape(args[0])} act={args[6]}{scale}"
    if op == "bias_residual_layernorm":
        extra = ("+res" if args[1] is not None else "") + ("+bias" if args[2] is not None else "")
        return f"y={_shape(args[0])}{extra}"
    if op == "sgmv_shrink":
        return f"x={_shape(args[0])} items={args[3].numel()} max_rank={args[9]}"
    if op == "sgmv_expand":
        return f"y={_shape(args[0])} tmp={_shape(args[1])} items={args[4].numel()}"
    if op == "adapter_residual_layernorm":
        return f"y={_shape(args[0])} max_rank={args[12]}"
    if op == "seg_spmm":
        return f"y={_shape(args[0])} x={_shape(args[1])} items={args[3].numel()}"
    return f"y={_shape(args[0])} x={_shape(args[1])} items={args[3].numel()}"


def capture(case: Case, tasks_per_type: int, keep: int) -> list[dict[str, Any]]:
    """The petops calls of one execute of ``case``: ``[{op, key, calls, args: [args, ...]}]``
    with at most ``keep`` recorded argument lists per group (the layers repeat shapes)."""
    import numpy as np

    from petops import ops
    from pets.backbone import load_backbone, resolve_checkpoint
    from pets.engine import Engine
    from pets.heads import HeadConfig
    from pets.pet import pet_types
    from pets.taskgen import random_task

    groups: dict[tuple[str, str], dict[str, Any]] = {}
    into: dict[tuple[str, str], dict[str, Any]] = groups
    recording = False
    real_call: Callable[..., Any] = ops._call

    def record(op: str, device: torch.device, *args: Any) -> Any:
        if recording:
            key = call_key(op, args)
            g = into.setdefault((op, key), {"op": op, "key": key, "calls": 0, "args": []})
            g["calls"] += 1
            if len(g["args"]) < keep:  # before the call: the in-place ops change args[0]
                g["args"].append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return real_call(op, device, *args)

    weights = load_backbone(resolve_checkpoint(case.backbone, REPO_ROOT))
    types = sorted(pet_types()) * tasks_per_type
    rng = np.random.default_rng(0)
    ids = [rng.integers(1000, 30000, size=case.length) for _ in range(case.batch)]
    ops._call = record  # type: ignore[assignment]
    try:
        for fmt in ("auto", "bitmask"):
            with tempfile.TemporaryDirectory() as store:
                eng = Engine.from_parameters(
                    {
                        "BACKBONE": case.backbone,
                        "TASK_STORE": store,
                        "REFRESH_MS": "0",
                        "DTYPE": "float32",
                        "MASKBERT_FORMAT": fmt,
                    },
                    model_dir=REPO_ROOT,
                    device="cpu",
                )
                names = []
                for i, pet in enumerate(types):
                    head = HeadConfig("classification", num_labels=2)
                    m, t = random_task(weights, f"{pet}_{i}", pet, head, seed=i)
                    eng.registry.add(m, t)
                    names.append(m.name)
                tasks = [names[i % len(names)] for i in range(case.batch)]
                eng.run(ids, tasks)  # warm-up: staging buffers, plans
                into = groups if fmt == "auto" else {}
                recording = True
                eng.run(ids, tasks)
                recording = False
                eng.close()
            if fmt == "bitmask":  # MaskBERT as bit masks: only its seg_masked_mm calls
                groups.update({k: g for k, g in into.items() if g["op"] == "seg_masked_mm"})
    finally:
        ops._call = real_call  # type: ignore[assignment]
    return sorted(groups.values(), key=lambda g: (g["op"], g["key"]))


def time_groups(
    groups: list[dict[str, Any]], threads: Sequence[int], iters: int
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Median and p90 microseconds per call of every group at each thread count, and each
    group's first output. Runs in the worker, with only the library under test loaded."""
    rows = []
    outputs: list[torch.Tensor] = []  # the first call of each group, on fresh copies
    for g in groups:
        args = g["args"][0]
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        out = getattr(torch.ops.petops, g["op"]).default(*fresh)
        outputs.append(fresh[0] if g["op"] in INPLACE else out)
    for n in threads:
        torch.set_num_threads(n)
        for g in groups:
            fn = getattr(torch.ops.petops, g["op"]).default
            saved = [a[0].clone() for a in g["args"]] if g["op"] in INPLACE else []
            samples = []
            for it in range(iters + 3):
                for c, args in enumerate(g["args"]):
                    if saved:
                        args[0].copy_(saved[c])
                    t0 = time.perf_counter_ns()
                    fn(*args)
                    dt = time.perf_counter_ns() - t0
                    if it >= 3:  # warm-up
                        samples.append(dt / 1e3)
            if saved:
                for c, args in enumerate(g["args"]):
                    args[0].copy_(saved[c])
            samples.sort()
            rows.append(
                {
                    "threads": n,
                    "op": g["op"],
                    "call": g["key"],
                    "median_us": statistics.median(samples),
                    "p90_us": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
                }
            )
    return rows, outputs


def worker(args: argparse.Namespace) -> None:
    """``--worker``: load one library, time the saved calls, write rows + outputs."""
    torch.ops.load_library(str(args.library_path))
    cases = torch.load(args.calls, weights_only=False)
    result: dict[str, Any] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    threads = [int(t) for t in args.threads.split(",")]
    for name, groups in cases.items():
        rows, outs = time_groups(groups, threads, args.iters)
        result[name] = rows
        outputs[name] = outs
    Path(args.result).write_text(json.dumps(result))
    torch.save(outputs, args.result + ".pt")


def _spawn(label: str, lib: Path, calls: Path, tmp: Path, args: argparse.Namespace, r: int) -> Any:
    result = tmp / f"{label}_{r}.json"
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "backend"), str(REPO_ROOT / "cuda_ops")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "clients.bench.cpu_ops", "--worker", "--library-path", str(lib)]
    cmd += ["--calls", str(calls), "--result", str(result), "--threads", args.threads]
    cmd += ["--iters", str(args.iters)]
    subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)
    return json.loads(result.read_text()), torch.load(str(result) + ".pt")


def main(argv: Sequence[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="BACKBONE:BxL,... (default %(default)s)")
    p.add_argument("--tasks-per-type", type=int, default=2, help="tasks of every PET type")
    p.add_argument("--threads", default="1,2", help="torch intra-op thread counts")
    p.add_argument("--iters", type=int, default=100, help="timed calls per group and setting")
    p.add_argument("--keep", type=int, default=2, help="recorded calls per group (layers)")
    p.add_argument("--rounds", type=int, default=1, help="alternations of the libraries")
    p.add_argument(
        "--library",
        action="append",
        metavar="LABEL=PATH",
        help=f"a libpetops.so to time (repeatable; default this={DEFAULT_LIBRARY})",
    )
    add_out_argument(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--library-path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--calls", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None

    cases = parse_cases(args.cases)
    libs = parse_libraries(args.library)
    hidden = ("worker", "library_path", "calls", "result")
    params = {k: v for k, v in vars(args).items() if k not in hidden}
    run = start_run(
        "cpu_ops", args.out, params={**params, "library": [f"{k}={v}" for k, v in libs]}
    )
    captured = {}
    meta: dict[str, tuple[int, int, dict[tuple[str, str], int]]] = {}
    for case in cases:
        groups = capture(case, args.tasks_per_type, args.keep)
        captured[case.name] = groups
        hidden = int(groups[0]["args"][0][0].shape[1]) if groups else 0
        for g in groups:
            if g["op"] == "bias_residual_layernorm":
                hidden = int(g["args"][0][0].shape[1])
        counts = {(g["op"], g["key"]): g["calls"] for g in groups}
        meta[case.name] = (case.batch * case.length, hidden, counts)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        calls = tmp / "calls.pt"
        torch.save(captured, calls)
        best: dict[tuple[str, str, int, str, str], dict[str, Any]] = {}
        first_out: dict[str, list[torch.Tensor]] = {}
        diffs: dict[tuple[str, str, str], float] = {}
        for r in range(args.rounds):
            for label, lib in libs:
                timed, outs = _spawn(label, lib, calls, tmp, args, r)
                for name, case_rows in timed.items():
                    if label == libs[0][0]:
                        first_out.setdefault(name, outs[name])
                    for gi, g in enumerate(captured[name]):
                        a, b = outs[name][gi], first_out[name][gi]
                        diffs[(name, label, g["key"])] = (
                            float((a - b).abs().max()) if a.numel() else 0.0
                        )
                    for row in case_rows:
                        k = (name, label, row["threads"], row["op"], row["call"])
                        if k not in best or row["median_us"] < best[k]["median_us"]:
                            best[k] = row
    for case in cases:
        tokens, hidden, counts = meta[case.name]
        for n in (int(t) for t in args.threads.split(",")):
            totals: dict[str, float] = {}
            for (op, key), calls_n in counts.items():
                first = best[(case.name, libs[0][0], n, op, key)]["median_us"]
                for label, _ in libs:
                    row = best[(case.name, label, n, op, key)]
                    per_exec = row["median_us"] * calls_n
                    totals[label] = totals.get(label, 0.0) + per_exec
                    rows.append(
                        {
                            "case": case.name,
                            "tokens": tokens,
                            "hidden": hidden,
                            "threads": n,
                            "op": op,
                            "call": key,
                            "calls": calls_n,
                            "library": label,
                            "median_us": round(row["median_us"], 2),
                            "p90_us": round(row["p90_us"], 2),
                            "per_execute_us": round(per_exec, 1),
                            "speedup_vs_first": round(first / row["median_us"], 3),
                            "max_abs_diff": diffs[(case.name, label, key)],
                        }
                    )
            for label, _ in libs:
                rows.append(
                    {
                        "case": case.name,
                        "tokens": tokens,
                        "hidden": hidden,
                        "threads": n,
                        "op": "total",
                        "call": "all calls of one execute",
                        "calls": sum(counts.values()),
                        "library": label,
                        "median_us": "",
                        "p90_us": "",
                        "per_execute_us": round(totals[label], 1),
                        "speedup_vs_first": round(totals[libs[0][0]] / totals[label], 3),
                        "max_abs_diff": "",
                    }
                )
    run.write_csv("cpu_ops.csv", rows, FIELDS)
    print_table(rows, [label for label, _ in libs])
    return run.finish()


def print_table(rows: list[dict[str, Any]], labels: Sequence[str]) -> None:
    """One line per case, threads and group: median us per call for each library."""
    by: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["case"], r["threads"], r["op"], r["call"], r["calls"]), {})[
            r["library"]
        ] = r
    head = f"{'case':<20} {'thr':>3} {'op / call':<62} {'calls':>5}"
    head += "".join(f" {lab[:10]:>10}" for lab in labels)
    if len(labels) > 1:
        head += f" {'speedup':>8} {'maxdiff':>8}"
    print(head)
    for (case, n, op, call, calls), per in by.items():
        total = op == "total"
        vals = [per[lab]["per_execute_us"] if total else per[lab]["median_us"] for lab in labels]
        line = f"{case:<20} {n:>3} {(op + ' ' + call)[:62]:<62} {calls:>5}"
        line += "".join(f" {v:>10.1f}" for v in vals)
        if len(labels) > 1:
            last = per[labels[-1]]
            diff = "" if total else f"{last['max_abs_diff']:.1e}"
            line += f" {last['speedup_vs_first']:>8.2f} {diff:>8}"
        print(line)
    print("(us per call; 'total' rows: us of all the op calls of one execute)")


if __name__ == "__main__":
    main()
