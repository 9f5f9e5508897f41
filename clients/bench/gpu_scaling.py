"""Throughput on one GPU vs on N GPUs of one host, same store, same data, one call.

Serves `pets` twice from a fresh store of mixed-type tasks, placed by ``pets.placement``
(one instance group per GPU, ``--instances-per-gpu`` each): first on the first GPU of
``--gpus``, then on all of them. perf_analyzer (gRPC, async) drives each server at
``--concurrency-per-gpu`` x GPUs, so both are loaded alike per GPU. Prints and writes
(``gpu_scaling.csv`` in a dated run folder, clients/bench/results.py) the rates and
``scaling = rate(N) / (N x rate(1))``; the issue-21 target is >= 0.9. During each measured
window a task is registered in the shared store and asked for; the row says how many of
its 32 answers came back and on how many instances (every GPU's) the resident-task gauge
rose by one.

    python -m clients.bench.gpu_scaling --gpus 0,1                       # bert-base, 64 tasks
    python -m clients.bench.gpu_scaling --gpus all --concurrency-per-gpu 512
    python -m clients.bench.gpu_scaling --cpu 2 --backbone bert-tiny --tasks 8 \\
        --concurrency-per-gpu 8 --interval-ms 2000 --stability 100       # the flow, on a CPU

``--cpu K`` compares 1 CPU instance with K (the flow, on a machine without GPUs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from clients.bench.results import add_out_argument, start_run
from clients.bench.served_overhead import make_data, perf
from clients.pets_client import start_tritonserver, triton_env
from pets.backbone import load_backbone
from pets.heads import HeadConfig
from pets.metrics import GAUGES, parse_prometheus
from pets.pet import pet_types
from pets.placement import Placement, discover_gpus, render_repository, select_gpus, visible_gpus
from pets.taskgen import random_task
from pets.taskstore import delete_task, write_task

ROOT = Path(__file__).resolve().parents[2]


def make_store(store: Path, backbone: str, tasks: int) -> list[str]:
    """``tasks`` random tasks cycling over every PET type; returns their names."""
    weights = load_backbone(backbone)
    types = sorted(pet_types())
    names = []
    for i in range(tasks):
        name = f"t{i}_{types[i % len(types)]}"
        head = HeadConfig("classification", num_labels=2)
        write_task(store, *random_task(weights, name, types[i % len(types)], head, seed=i))
        names.append(name)
    return names


NEW_TASK = "registered_mid_run"


def _resident(metrics_url: str) -> dict[str, float]:
    """``pets_tasks_resident`` of every instance: ``{"instance (device)": tasks}``."""
    with urllib.request.urlopen(f"http://{metrics_url}", timeout=5) as r:
        text = r.read().decode()
    return {
        f"{lab.get('instance')} ({lab.get('device', '?')})": value
        for name, lab, value in parse_prometheus(text)
        if name == GAUGES["tasks_resident"][0]
    }


def _register_and_ask(args: argparse.Namespace, store: Path, http_url: str) -> int:
    """Register a task in the shared store (what `pets create` does) and ask for it 32
    times; returns how many answers came back (the load keeps running meanwhile)."""
    import numpy as np
    import tritonclient.http as httpclient

    weights = load_backbone(args.backbone)
    head = HeadConfig("classification", num_labels=2)
    write_task(store, *random_task(weights, NEW_TASK, "lora", head, seed=999))
    client = httpclient.InferenceServerClient(http_url)
    ok = 0
    for _ in range(32):
        task = httpclient.InferInput("TASK", [1, 1], "BYTES")
        task.set_data_from_numpy(np.array([[NEW_TASK]], dtype=object))
        ids = httpclient.InferInput("INPUT_IDS", [1, args.length], "INT64")
        ids.set_data_from_numpy(np.full((1, args.length), 1000, dtype=np.int64))
        out = client.infer("pets", [task, ids]).as_numpy("OUTPUT")
        ok += int(out is not None and out.shape == (1, 2))
    return ok


def serve_and_measure(
    args: argparse.Namespace,
    env: dict[str, str],
    repo: Path,
    store: Path,
    data: Path,
    c: int,
    log: Path,
) -> dict[str, float]:
    """Start tritonserver on ``repo``, run perf_analyzer at concurrency ``c`` and register a
    task in ``store`` meanwhile; stop it. The task is removed again afterwards."""
    server = start_tritonserver(
        repo, log, env, extra=["--disable-auto-complete-config"], ready_s=args.ready_s
    )
    try:
        url = server.grpc_url
        try:  # warm-up (CUDA graphs, the allocator); an unstable window is fine here
            perf(args, env, url, "pets", data, c, log.parent, args.stability)
        except SystemExit as exc:
            print(f"warm-up: {str(exc).splitlines()[0]}", file=sys.stderr)
        resident = _resident(server.metrics_url)
        got: dict[str, float] = {}
        measured = threading.Thread(
            target=lambda: got.update(
                perf(args, env, url, "pets", data, c, log.parent, args.stability)
            )
        )
        measured.start()
        time.sleep(args.interval_ms / 1000)  # register a task while the load runs
        got["new_task_answers"] = _register_and_ask(args, store, server.http_url)
        measured.join()
        time.sleep(2.5)  # the instance gauges are pushed once a second
        after = _resident(server.metrics_url)
        grew = [after.get(k, 0) - v for k, v in resident.items()]
        got["instances_with_new_task"] = sum(1 for d in grew if d == 1)
        got["instances_seen"] = len(resident)
        return got
    finally:
        server.stop()
        if (store / NEW_TASK).exists():
            delete_task(store, NEW_TASK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--gpus", default="all", help="'all' or CUDA ordinals '0,1,...'")
    where.add_argument("--cpu", type=int, help="compare 1 CPU instance with this many")
    ap.add_argument("--instances-per-gpu", type=int, default=2)
    ap.add_argument("--backbone", default="bert-base")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--length", type=int, default=64, help="tokens per request")
    ap.add_argument("--concurrency-per-gpu", type=int, default=256)
    ap.add_argument("--interval-ms", type=int, default=5000)
    ap.add_argument("--stability", type=int, default=10, help="perf_analyzer stability %%")
    ap.add_argument("--ready-s", type=float, default=600.0)
    ap.add_argument("--devices-csv", help="nvidia-smi CSV instead of running it (tests)")
    add_out_argument(ap)
    args = ap.parse_args(argv)

    if args.cpu:
        setups = [("1 CPU instance", Placement(cpu=1), 1),
                  (f"{args.cpu} CPU instances", Placement(cpu=args.cpu), args.cpu)]  # fmt: skip
        dtype = "float32"
    else:
        gpus = select_gpus(
            args.gpus,
            visible_gpus(discover_gpus(args.devices_csv), os.environ.get("CUDA_VISIBLE_DEVICES")),
        )
        if len(gpus) < 2:
            raise SystemExit(f"--gpus {args.gpus} gives {len(gpus)} GPU; scaling needs 2 or more")
        per = args.instances_per_gpu
        setups = [
            (f"1 GPU ({gpus[0].name})", Placement(gpus=(gpus[0],), per_gpu=per), 1),
            (f"{len(gpus)} GPUs", Placement(gpus=tuple(gpus), per_gpu=per), len(gpus)),
        ]
        dtype = "float16"
    run = start_run("gpu_scaling", args.out, params=vars(args))
    env = triton_env(ROOT)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pets-scaling-") as td:
        tmp = Path(td)
        # A private backend directory: this checkout's shell beside the installed python one.
        backends = tmp / "backends"
        (backends / "pets").mkdir(parents=True)
        (backends / "python").symlink_to(Path(env["PETS_TRITON_BACKENDS"]) / "python")
        shutil.copy2(ROOT / "backend" / "model.py", backends / "pets" / "model.py")
        env = {**env, "PETS_TRITON_BACKENDS": str(backends)}
        names = make_store(tmp / "store", args.backbone, args.tasks)
        data = tmp / "data.json"
        make_data(data, names, str(args.length), 512)
        src = tmp / "src"
        shutil.copytree(ROOT / "model_repository" / "pets", src / "pets")  # pets alone
        for label, placement, units in setups:
            repo = tmp / f"repo{units}"
            render_repository(
                src, repo, placement,
                pets_params={"DTYPE": dtype},
                shared_params={"BACKBONE": args.backbone, "TASK_STORE": str(tmp / "store")},
            )  # fmt: skip
            c = args.concurrency_per_gpu * units
            got = serve_and_measure(
                args, env, repo, tmp / "store", data, c, run.path(f"tritonserver_{units}.log")
            )
            row = {"setup": label, "units": units, "instances": placement.instances,
                   "concurrency": c, **{k: round(v, 3) for k, v in got.items()}}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    one, many = rows
    scaling = many["req_per_s"] / (many["units"] * one["req_per_s"])
    print(
        f"scaling: {many['setup']} {many['req_per_s']:.0f} req/s = {scaling:.3f} x "
        f"{many['units']} x {one['req_per_s']:.0f} req/s on {one['setup']} (target >= 0.9)"
    )
    for r in rows:
        r["scaling"] = round(scaling, 4)
    run.write_csv("gpu_scaling.csv", rows)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
