"""Concurrency sweep with perf_analyzer (gRPC, async) against a running `pets` server.

Runs one perf_analyzer per concurrency level (levels need not be evenly spaced), merges the
CSV rows (`-f ... --verbose-csv`) into ``sweep.csv`` in a dated run folder under ``--out``
(``clients/bench/results.py``, with the input data when it was made here), prints the
latency-throughput curve (concurrency -> req/s, p50, p99), the best throughput whose p99 stays
under ``--p99-ms``, and draws ``curve.png`` (req/s against p99). Needs build/install_triton.sh
(perf_analyzer + its libraries via build/triton/env.sh).

  python -m clients.bench.perf_sweep                       # demo tasks, length 64, 1..128
  python -m clients.bench.perf_sweep --data var/perf/mixed.json --concurrency 1,8,32,64,128
  python -m clients.bench.perf_sweep --make-data "--tasks-from-store var/store64 --length 64"
  python -m clients.bench.perf_sweep --concurrency 1,16,64,256,512 --p99-ms 50
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
    p.add_argument("--p99-ms", type=float, default=50.0, help="latency bound of the summary")
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
    curve = summarize(header, rows)
    print(f"{'concurrency':>12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for c, rps, p50, p99 in curve:
        print(f"{c:>12} {rps:>10.1f} {p50:>8.2f} {p99:>8.2f}")
    best = best_under(curve, a.p99_ms)
    if best is None:
        print(f"no concurrency kept p99 under {a.p99_ms} ms")
    else:
        print(f"best under p99 {a.p99_ms} ms: {best[1]:.1f} req/s at concurrency {best[0]} "
              f"(p50 {best[2]:.2f} ms, p99 {best[3]:.2f} ms)")  # fmt: skip
    out.update(best_under_p99=None if best is None else list(best))
    plot(curve, a.p99_ms, out.path("curve.png"))
    out.finish()
    return 0


def summarize(header: list[str], rows: list[list[str]]) -> list[tuple[int, float, float, float]]:
    """(concurrency, req/s, p50 ms, p99 ms) per level, from perf_analyzer's CSV (µs)."""
    cols = {name: i for i, name in enumerate(header)}
    return [
        (
            int(r[cols["Concurrency"]]),
            float(r[cols["Inferences/Second"]]),
            float(r[cols["p50 latency"]]) / 1e3,
            float(r[cols["p99 latency"]]) / 1e3,
        )
        for r in rows
    ]


def best_under(
    curve: list[tuple[int, float, float, float]], p99_ms: float
) -> tuple[int, float, float, float] | None:
    """The level of highest throughput whose p99 is at most ``p99_ms`` (None: no level)."""
    ok = [pt for pt in curve if pt[3] <= p99_ms]
    return max(ok, key=lambda pt: pt[1]) if ok else None


def plot(curve: list[tuple[int, float, float, float]], p99_ms: float, path: Path) -> None:
    """req/s against p99 latency, each point labelled with its concurrency."""
    from clients.bench.results import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([pt[3] for pt in curve], [pt[1] for pt in curve], marker="o")
    for c, rps, _, p99 in curve:
        ax.annotate(str(c), (p99, rps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(p99_ms, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("requests / s")
    ax.set_title("latency-throughput curve (labels: concurrency)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
