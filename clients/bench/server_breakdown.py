"""Where a served batch's time goes: Triton's execute vs the pets engine's forward.

Snapshots the metrics endpoint, runs a load command (e.g. ``clients.bench.perf_sweep``),
snapshots again and prints, for one model, per execute: the batch size Triton delivered,
Triton's compute time (``nv_inference_compute_infer_duration_us``, summed per request, so
divided by the requests here) and the engine's forward time (``pets_task_compute_us_total``
summed over tasks). The gap is the Python stub's own work per execute: reading the request
tensors, decoding, building and sending the responses. Prints one JSON object and writes it
as ``breakdown.json`` to a dated run folder under ``--out`` (``clients/bench/results.py``).

    python -m clients.bench.server_breakdown --metrics-url 127.0.0.1:8002/metrics -- \\
        python -m clients.bench.perf_sweep --concurrency 64 --make-data "--length 32"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from collections import defaultdict

from clients.bench.results import add_out_argument, start_run
from pets.metrics import COUNTERS, parse_prometheus

# The engine's per-task series that give forward time per sequence.
REQUESTS, COMPUTE_US = COUNTERS["requests"][0], COUNTERS["compute_us"][0]


def _fetch(url: str) -> str:
    return urllib.request.urlopen(f"http://{url}", timeout=10).read().decode()


def scrape(url: str, model: str) -> dict[str, float]:
    """Sum of every metric's series whose ``model`` label is ``model``."""
    out: dict[str, float] = defaultdict(float)
    for name, labels, value in parse_prometheus(_fetch(url)):
        if labels.get("model") == model:
            out[name] += value
    return out


def scrape_tasks(url: str, model: str) -> dict[tuple[str, str], float]:
    """``{(metric, task): value}`` of ``model``'s per-task request and forward-time series."""
    return parse_tasks(_fetch(url), model)


def parse_tasks(text: str, model: str) -> dict[tuple[str, str], float]:
    """``model``'s per-task request and forward-time series in a Prometheus text page,
    summed over their other labels (instances): ``{(metric, task): value}``."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for name, labels, value in parse_prometheus(text):
        if name in (REQUESTS, COMPUTE_US) and labels.get("model") == model and "task" in labels:
            out[name, labels["task"]] += value
    return out


def forward_by_group(
    before: dict[tuple[str, str], float],
    after: dict[tuple[str, str], float],
    group_of: dict[str, str],
) -> dict[str, float]:
    """Mean forward milliseconds per served sequence for each group of tasks (e.g. PET type)
    between two :func:`scrape_tasks` snapshots; ``group_of`` maps task -> group. A forward
    that served several tasks is split among them by token share (the engine's
    ``pets_task_compute_us_total``), so at one request per execute this is that request's
    forward time. Groups that served nothing are left out."""
    seqs: dict[str, float] = defaultdict(float)
    us: dict[str, float] = defaultdict(float)
    for (metric, task), value in after.items():
        group = group_of.get(task)
        if group is None:
            continue
        delta = value - before.get((metric, task), 0.0)
        if metric == REQUESTS:
            seqs[group] += delta
        elif metric == COMPUTE_US:
            us[group] += delta
    return {g: us[g] / seqs[g] / 1e3 for g in sorted(seqs) if seqs[g] > 0}


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
    execs = d.get("nv_inference_exec_count", 0.0)
    reqs = d.get("nv_inference_request_success", 0.0)
    if execs <= 0 or reqs <= 0:
        raise SystemExit("no successful executes between the two scrapes; is the load running?")
    execute_ms = d.get("nv_inference_compute_infer_duration_us", 0.0) / reqs / 1e3
    engine_ms = d.get("pets_task_compute_us_total", 0.0) / execs / 1e3
    return {
        "executes": execs,
        "requests": reqs,
        "requests_per_execute": reqs / execs,
        "execute_ms": execute_ms,
        "engine_forward_ms": engine_ms,
        "stub_ms": execute_ms - engine_ms,
        "engine_share": engine_ms / execute_ms if execute_ms > 0 else float("nan"),
        "queue_ms_per_request": d.get("nv_inference_queue_duration_us", 0.0) / reqs / 1e3,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--metrics-url", default="127.0.0.1:8002/metrics")
    p.add_argument("--model", default="pets")
    add_out_argument(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="load command, after --")
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the load command after --")
    out = start_run("server_breakdown", a.out, params={**vars(a), "command": cmd})
    before = scrape(a.metrics_url, a.model)
    done = subprocess.run(cmd)
    if done.returncode:
        out.finish(f"failed: the load command exited with {done.returncode}")
        return done.returncode
    result = breakdown(before, scrape(a.metrics_url, a.model))
    summary = {k: round(v, 3) for k, v in result.items()}
    print(json.dumps(summary), flush=True)
    out.write_json("breakdown.json", summary, indent=None)
    out.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
