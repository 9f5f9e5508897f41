"""Closed-loop load generator for the `pets` model (asyncio tritonclient, HTTP or gRPC).

Each of --concurrency workers sends a request, waits for it, sends the next, until
--duration seconds or --count requests. Prints throughput and p50/p90/p99 latency.

  python clients/loadgen.py --protocol grpc --concurrency 32 --duration 10 --lengths 16:128
  python clients/loadgen.py --tasks demo_lora,demo_bitfit --weights 3,1 --count 2000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from clients.pets_client import (
    DEFAULT_URL,
    DEMO_TASKS,
    MODEL,
    build_inputs,
    client_module,
    parse_lengths,
    random_ids,
)


class Stats:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.errors: dict[str, int] = {}
        self.rows = 0


async def worker(
    a: argparse.Namespace, client: Any, mod: Any, stats: Stats, seed: int, stop: list[float]
) -> None:
    rng = np.random.default_rng(seed)
    tasks = a.tasks.split(",")
    w = np.array([float(x) for x in a.weights.split(",")]) if a.weights else np.ones(len(tasks))
    w = w / w.sum()
    kind, vals = parse_lengths(a.lengths)
    while time.perf_counter() < stop[0] and (a.count is None or len(stats.lat) < a.count):
        n = int(rng.integers(vals[0], vals[1] + 1)) if kind == "uniform" else int(rng.choice(vals))
        task = str(rng.choice(tasks, p=w))
        inputs = build_inputs(mod, task, ids=random_ids(rng, n, a.rows), int32=a.int32)
        t0 = time.perf_counter()
        try:
            await client.infer(a.model, inputs)
            stats.lat.append(time.perf_counter() - t0)
            stats.rows += a.rows
        except Exception as exc:
            key = str(exc)[:120]
            stats.errors[key] = stats.errors.get(key, 0) + 1
            if sum(stats.errors.values()) > a.max_errors:
                stop[0] = 0.0


async def run(a: argparse.Namespace) -> dict[str, Any]:
    mod = client_module(a.protocol, aio=True)
    client = mod.InferenceServerClient(a.url or DEFAULT_URL[a.protocol])
    stats = Stats()
    try:
        t0 = time.perf_counter()
        stop = [t0 + a.duration]
        await asyncio.gather(
            *(worker(a, client, mod, stats, a.seed + i, stop) for i in range(a.concurrency))
        )
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    lat_ms = np.array(stats.lat) * 1e3
    pct = {
        f"p{q}_ms": float(np.percentile(lat_ms, q)) if len(lat_ms) else None for q in (50, 90, 99)
    }
    return {
        "protocol": a.protocol,
        "concurrency": a.concurrency,
        "tasks": a.tasks,
        "lengths": a.lengths,
        "rows_per_request": a.rows,
        "requests": len(stats.lat),
        "errors": sum(stats.errors.values()),
        "error_kinds": stats.errors,
        "seconds": wall,
        "requests_per_s": len(stats.lat) / wall,
        "rows_per_s": stats.rows / wall,
        **pct,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="host:port (default 127.0.0.1:8000 http / :8001 grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated task names")
    p.add_argument("--weights", help="comma-separated task weights (default uniform)")
    p.add_argument("--lengths", default="16:128", help="L | LO:HI (uniform) | L1,L2 (choice)")
    p.add_argument("--rows", type=int, default=1, help="sequences per request (same length)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="seconds (upper bound)")
    p.add_argument("--count", type=int, help="stop after this many successful requests")
    p.add_argument("--max-errors", type=int, default=100, help="abort after this many errors")
    p.add_argument("--int32", action="store_true", help="send INPUT_IDS_INT32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.weights and len(a.weights.split(",")) != len(a.tasks.split(",")):
        p.error("--weights needs one weight per task in --tasks")
    if a.concurrency < 1 or a.rows < 1 or a.duration <= 0:
        p.error("--concurrency and --rows must be >= 1 and --duration > 0")
    r = asyncio.run(run(a))
    if a.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['requests']} requests ({r['errors']} errors) in {r['seconds']:.2f} s: "
            f"{r['requests_per_s']:.1f} req/s, {r['rows_per_s']:.1f} seq/s; latency "
            f"p50 {r['p50_ms'] or 0:.2f} ms, p90 {r['p90_ms'] or 0:.2f} ms, "
            f"p99 {r['p99_ms'] or 0:.2f} ms"
        )
        for msg, n in r["error_kinds"].items():
            print(f"  {n} x {msg}", file=sys.stderr)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
