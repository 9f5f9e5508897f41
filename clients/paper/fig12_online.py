"""PetS Fig. 12, online: every policy served by a real tritonserver, driven by perf_analyzer.

One model repository holds one model per policy (``pets_<policy>``, same backbone, task
store and batcher; only ``SCHEDULER`` differs; per-task metrics are off, ``METRICS=0``, so
six models do not each publish per-task series), so one ``build/serve.sh`` start serves them
all (set-up skipped: run ``make triton`` once). Each policy is measured in turn with
perf_analyzer (gRPC, async, fixed concurrency) over a query pool whose lengths follow
N(mean, std) clipped to [1, 128] and whose tasks are uniform over the first N tasks of the
store (N from ``--tasks``; the store must hold at least max N). Throughput is normalised to
the ``fixed`` policy; scheduling runs inside ``execute``, so its time counts. Writes
``fig12_online.csv`` and ``fig12_online.png``, with each point's perf_analyzer data and CSV, to
a dated run folder under ``--out`` (``clients/bench/results.py``).

    python -m clients.paper.fig12_online --store var/fig12_cpu_store --stds 4
    python -m clients.paper.fig12_online --store var/fig12_store --backbone bert-base \
        --serve-args=--gpu --stds 1,2,4,8 --tasks 32,64,128 --concurrency 128
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from clients.bench import perf_sweep
from clients.bench.make_perf_data import main as make_data_main
from clients.bench.results import REPO_ROOT as ROOT
from clients.bench.results import add_out_argument, start_run
from clients.paper.fig12 import plot

POLICIES = "fixed,beta_only,alpha_only,coordinated,token_budget,task_grouped"


def set_param(config: str, key: str, value: str) -> str:
    """Set (or add) a string parameter of a config.pbtxt text."""
    pat = re.compile(rf'(key: "{key}" value \{{ string_value: )"[^"]*"')
    if pat.search(config):
        return pat.sub(rf'\1"{value}"', config)
    return config + f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def serve(repo: Path, store: Path, port_base: int, extra: list[str]) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        PETS_MODEL_REPOSITORY=str(repo),
        PETS_DEMO_STORE=str(store),
        PETS_SKIP_SETUP="1",
        PETS_HTTP_PORT=str(port_base),
        PETS_GRPC_PORT=str(port_base + 1),
        PETS_METRICS_PORT=str(port_base + 2),
    )
    proc = subprocess.Popen(
        ["bash", "build/serve.sh", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port_base}/v2/health/ready", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"serve.sh exited with {proc.returncode}") from None
            time.sleep(1)
    stop(proc)
    raise SystemExit("the server did not become ready in 300 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(
    port_base: int, model: str, data: Path, concurrency: int, interval_ms: int, out: Path
) -> float | None:
    """perf_analyzer throughput (req/s), or None when no stable window was found.

    A first try uses ``interval_ms`` windows; if perf_analyzer cannot find three windows
    within 50% of each other it is retried once with windows twice as long. A point that
    stays unstable is reported as missing, not guessed, and the sweep goes on.
    """
    for window in (interval_ms, 2 * interval_ms):
        args = perf_sweep.parse_args(
            [
                "--url", f"127.0.0.1:{port_base + 1}", "--model", model,
                "--concurrency", str(concurrency), "--interval-ms", str(window),
                "--max-trials", "6",
                # a loaded box rarely holds perf_analyzer's default 10% window-to-window band
                "--extra", "--stability-percentage 50",
            ]
        )  # fmt: skip
        try:
            header, rows = perf_sweep.sweep(args, data)
        except perf_sweep.PerfAnalyzerError as exc:
            print(
                f"{model}: perf_analyzer found no stable {window} ms windows:\n{str(exc)[-600:]}",
                file=sys.stderr,
                flush=True,
            )
            continue
        with out.open("w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])
        return float(rows[0][header.index("Inferences/Second")])
    return None


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_repository(repo: Path, policies: list[str], args: argparse.Namespace) -> None:
    """One ``pets_<policy>`` model per policy, each a copy of the shipped config."""
    base = (ROOT / "model_repository/pets/config.pbtxt").read_text()
    for policy in policies:
        cfg = base.replace('name: "pets"', f'name: "pets_{policy}"', 1)
        cfg = set_param(set_param(cfg, "SCHEDULER", policy), "BACKBONE", args.backbone)
        cfg = set_param(cfg, "BATCH_SIZE", str(args.fixed_batch))
        cfg = set_param(cfg, "METRICS", "0")
        if args.cost_table:
            cfg = set_param(cfg, "COST_TABLE", str(args.cost_table.resolve()))
        (repo / f"pets_{policy}/1").mkdir(parents=True)
        (repo / f"pets_{policy}/config.pbtxt").write_text(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--backbone", default="default")
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--stds", default="4")
    p.add_argument("--mean", type=float, default=32)
    p.add_argument("--tasks", default="64", help="comma list of task counts (first N of store)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--fixed-batch", type=int, default=32)
    p.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer window")
    p.add_argument("--cost-table", type=Path, default=None)
    p.add_argument("--port-base", type=int, default=18000)
    p.add_argument("--serve-args", default="", help='build/serve.sh flags, e.g. "--gpu"')
    add_out_argument(p)
    args = p.parse_args(argv)
    run = start_run("fig12_online", args.out, params=vars(args))
    store = args.store.resolve()
    policies = args.policies.split(",")
    repo = Path(tempfile.mkdtemp(prefix="pets-f12-"))
    write_repository(repo, policies, args)
    rows = []
    proc = serve(repo, store, args.port_base, args.serve_args.split())
    try:
        for n_tasks in (int(t) for t in args.tasks.split(",")):
            for std in (float(s) for s in args.stds.split(",")):
                rng = np.random.default_rng(int(std * 100))
                lengths = np.clip(np.rint(rng.normal(args.mean, std, size=256)), 1, 128)
                data = run.path(f"data_t{n_tasks}_std{std:g}.json")
                make_data_main(
                    [
                        "--tasks-from-store", str(store), "--num-tasks", str(n_tasks),
                        "--lengths", ",".join(str(int(v)) for v in lengths),
                        "--entries", "256", "-o", str(data),
                    ]
                )  # fmt: skip
                qps: dict[str, float | None] = {}
                for policy in policies:
                    qps[policy] = v = measure(
                        args.port_base,
                        f"pets_{policy}",
                        data,
                        args.concurrency,
                        args.interval_ms,
                        run.path(f"pa_{policy}_t{n_tasks}_std{std:g}.csv"),
                    )
                    shown = "unstable (no value)" if v is None else f"{v:.1f} req/s"
                    print(f"tasks={n_tasks} std={std:g} {policy}: {shown}", flush=True)
                fixed = qps.get("fixed")
                for policy, v in qps.items():
                    rows.append(
                        {
                            "std": std,
                            "num_tasks": n_tasks,
                            "concurrency": args.concurrency,
                            "policy": policy,
                            "req_per_s": None if v is None else round(v, 2),
                            "qps_norm": round(v / fixed, 3) if v and fixed else None,
                        }
                    )
                write_csv(run.path("fig12_online.csv"), rows)  # each point kept as it lands
    except BaseException as exc:
        run.finish(f"failed: {type(exc).__name__}")
        raise
    finally:
        stop(proc)
    if "fixed" in policies and rows:
        plotted = [
            {**r, "qps_norm": np.nan if r["qps_norm"] is None else r["qps_norm"]} for r in rows
        ]
        plot(
            plotted,
            policies,
            run.path("fig12_online.png"),
            f"online through Triton: {args.backbone}, perf_analyzer concurrency "
            f"{args.concurrency}, {args.serve_args or 'CPU'}",
        )
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
