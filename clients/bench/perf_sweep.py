"""Concurrency sweep with perf_analyzer (gRPC, async) against a running `pets` server.

Runs one perf_analyzer per concurrency level (levels need not be evenly spaced), merges the
CSV rows (`-f ... --verbose-csv`) into ``sweep.csv`` in a dated run folder under ``--out``
(``clients/bench/results.py``, with the input data when it was made here) and prints a
summary. Needs build/install_triton.sh (perf_analyzer + its libraries via build/triton/env.sh).

  python -m clients.bench.perf_sweep                       # demo tasks, length 64, 1..128
  python -m clients.bench.perf_sweep --data var/perf/mixed.json --concurrency 1,8,32,64,128
  python -m clients.bench.perf_sweep --make-data "--tasks-from-store var/store64 --length 64"
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from clients.bench.make_perf_data import main as make_data_main
from clients.bench.results import add_out_argument, start_run
from clients.pets_client import MODEL, triton_env


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer exited non-zero (e.g. no stable measurement window)."""


def run_level(a: argparse.Namespace, data: Path, c: int, tmp: Path, env: dict[str, str]) -> list:
    out = tmp / f"c{c}.csv"
    cmd = [
        a.perf_analyzer, "-m", a.model, "-i", "grpc", "-u", a.url, "--async",
        "--input-data", str(data), "--concurrency-range", str(c),
        "--measurement-interval", str(a.interval_ms), "--percentile", str(a.percentile),
        "--max-trials", str(a.max_trials), "-f", str(out), "--verbose-csv",
    ]  # fmt: skip
    if a.metrics_url:
        cmd += ["--collect-metrics", "--metrics-url", a.metrics_url]
    cmd += shlex.split(a.extra)
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise PerfAnalyzerError(
            f"perf_analyzer failed at concurrency {c} (exit {proc.returncode}):\n"
            + proc.stdout[-3000:]
            + proc.stderr[-3000:]
        )
    with out.open() as f:
        return list(csv.reader(f))


def sweep(a: argparse.Namespace, data: Path) -> tuple[list[str], list[list[str]]]:
    """perf_analyzer's CSV header and one row per concurrency level of ``a.concurrency``."""
    env = triton_env()
    header: list[str] = []
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="pets-sweep-") as td:
        for c in (int(x) for x in a.concurrency.split(",")):
            got = run_level(a, data, c, Path(td), env)
            header = header or got[0]
            rows += [r for r in got[1:] if r]
    return header, rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data", type=Path, help="perf_analyzer --input-data JSON")
    p.add_argument("--make-data", help="make_perf_data arguments to build the JSON instead")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64,128")
    p.add_argument("--interval-ms", type=int, default=5000, help="--measurement-interval")
    p.add_argument("--percentile", type=int, default=95)
    p.add_argument("--max-trials", type=int, default=10)
    p.add_argument("--metrics-url", help="e.g. 127.0.0.1:8002/metrics (adds GPU columns)")
    p.add_argument("--extra", default="", help="more perf_analyzer flags, one string")
    p.add_argument("--perf-analyzer", default="perf_analyzer", help="binary (PATH of env.sh)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per level")
    add_out_argument(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = start_run("perf_sweep", a.out, params=vars(a))
    data = a.data
    if data is None:
        data = out.path("data.json")
        make_data_main(["-o", str(data), *shlex.split(a.make_data or "")])
    try:
        header, rows = sweep(a, data)
    except PerfAnalyzerError as exc:
        out.finish("failed: perf_analyzer")
        raise SystemExit(str(exc)) from None
    with out.path("sweep.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    cols = {name: i for i, name in enumerate(header)}
    keys = ["Concurrency", "Inferences/Second", "p50 latency", "p99 latency"]
    print(" ".join(f"{k:>18}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[cols[k]]:>18}" if k in cols else f"{'-':>18}" for k in keys))
    out.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
