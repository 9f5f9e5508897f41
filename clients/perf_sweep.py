"""Concurrency sweep with perf_analyzer (gRPC, async) against a running `pets` server.

Runs one perf_analyzer per concurrency level (levels need not be evenly spaced), merges the
CSV rows (`-f ... --verbose-csv`) into one file and prints a summary. Needs
build/install_triton.sh (perf_analyzer + its libraries via build/triton/env.sh).

  python clients/perf_sweep.py --data var/perf/mixed.json --concurrency 1,8,32,64,128 \\
      --out var/perf/sweep.csv
  python clients/perf_sweep.py --make-data "--tasks-from-store var/store64 --length 64"
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from make_perf_data import main as make_data_main
from pets_client import MODEL, triton_env


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
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"perf_analyzer failed at concurrency {c} (exit {proc.returncode})")
    with out.open() as f:
        return list(csv.reader(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data", type=Path, help="perf_analyzer --input-data JSON")
    p.add_argument("--make-data", help="make_perf_data.py arguments to build the JSON instead")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64,128")
    p.add_argument("--interval-ms", type=int, default=5000, help="--measurement-interval")
    p.add_argument("--percentile", type=int, default=95)
    p.add_argument("--max-trials", type=int, default=10)
    p.add_argument("--metrics-url", help="e.g. 127.0.0.1:8002/metrics (adds GPU columns)")
    p.add_argument("--extra", default="", help="more perf_analyzer flags, one string")
    p.add_argument("--perf-analyzer", default="perf_analyzer", help="binary (PATH of env.sh)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per level")
    p.add_argument("--out", type=Path, default=Path("var/perf/sweep.csv"))
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]
    env = triton_env()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pets-sweep-") as td:
        tmp = Path(td)
        data = a.data
        if data is None:
            data = tmp / "data.json"
            make_data_main(["-o", str(data), *shlex.split(a.make_data or "")])
        header: list[str] = []
        rows: list[list[str]] = []
        for c in levels:
            got = run_level(a, data, c, tmp, env)
            header = header or got[0]
            rows += [r for r in got[1:] if r]
    with a.out.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    cols = {name: i for i, name in enumerate(header)}
    keys = ["Concurrency", "Inferences/Second", "p50 latency", "p99 latency"]
    print(" ".join(f"{k:>18}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[cols[k]]:>18}" if k in cols else f"{'-':>18}" for k in keys))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
