"""PetS Fig. 8, served: pets vs one Triton model per task (SeqS / ParS) through tritonserver.

A generated model repository holds ``pets_all`` (the pets model serving all N tasks from one
store) and ``task_0 .. task_{N-1}`` (pets models whose store holds one task each: a full
backbone per task, the served SeqS/ParS). Every model has one instance, ``KIND_GPU`` with
float16 under ``--gpu`` (the default on a CUDA host), else ``KIND_CPU``. One tritonserver
serves them all; a gRPC client (``tritonclient.grpc.aio``) drives rounds of one
``seq``-token request per task, as the in-process experiment does:

* ``seqs``: the N requests, each to its task's model, one after another;
* ``pars``: the N requests to the N task models at once (N processes share the device);
* ``pets``: the N requests at once to ``pets_all`` (Triton's dynamic batcher merges them,
  within a batching window of ``--queue-delay-us``, 2000 by default, as PetS's scheduler
  gathers the tasks' queries into one batch; the task models keep the shipped config's 0).

The window matters: on an H100 (16 tasks x 1 x 128) pets ran at 504-656 seq/s with the
shipped delay of 0, whose batcher starts an execute on the round's first arrivals, and at
958-1,154 with 2000 µs (docs/results/2026-12-08_h100_fig8_online_window).

QPS = ``N * rounds`` / the rounds' wall time (after ``--warmup`` rounds). perf_analyzer
drives one model at a time, so it cannot express SeqS/ParS over N models; the round driver
keeps the three systems under one method. Writes ``fig8_online.csv`` / ``.png`` and the
server log to a dated run folder (``clients/bench/results.py``). Needs ``make triton``.

    python -m clients.paper fig8_online --model bert-base --tasks 2,4,8,16 --seq 128
    python -m clients.paper fig8_online --model bert-tiny --tasks 2 --seq 16 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.bench.results import REPO_ROOT, Run, pyplot, start_run
from clients.paper.common import annotate, parse_ints, parse_types, task_weights
from clients.paper.fig8 import PAPER
from clients.paper.fig12_online import set_param
from clients.pets_client import build_inputs, client_module, set_queue_delay, start_tritonserver

TARGET = "issue 19 target, served: pets >= 15x SeqS and >= 2x ParS at 16 tasks, bs 1, len 128"
SYSTEMS = ("seqs", "pars", "pets")


def write_repository(
    repo: Path,
    model: str,
    n: int,
    types: tuple[str, ...],
    gpu: bool,
    seed: int,
    queue_delay_us: int | None = None,
) -> list[str]:
    """``pets_all`` + ``task_k`` models and their stores under ``repo``; the task names.
    ``queue_delay_us`` sets ``pets_all``'s batcher delay (the task models, which see one
    request at a time, keep the shipped config's)."""
    from pets.backbone import load_backbone, resolve_checkpoint
    from pets.taskstore import write_task

    host = load_backbone(resolve_checkpoint(model))
    base = (REPO_ROOT / "model_repository/pets/config.pbtxt").read_text()
    kind = "KIND_GPU count: 1 gpus: [ 0 ]" if gpu else "KIND_CPU count: 1"
    names: list[str] = []
    cache: dict[Any, Any] = {}
    for k in range(n):
        manifest, tensors = task_weights(
            host, f"task{k:03d}", types[k % len(types)], seed + k, cache
        )
        write_task(repo.parent / "stores" / "all", manifest, tensors)
        write_task(repo.parent / "stores" / f"task_{k}", manifest, tensors)
        names.append(manifest.name)
    for name in ["pets_all", *(f"task_{k}" for k in range(n))]:
        store = repo.parent / "stores" / ("all" if name == "pets_all" else name)
        cfg = base.replace('name: "pets"', f'name: "{name}"', 1)
        for key, value in {
            "BACKBONE": model,
            "TASK_STORE": str(store),
            "DTYPE": "float16" if gpu else "float32",
            "METRICS": "0",
            "REFRESH_MS": "0",
        }.items():
            cfg = set_param(cfg, key, value)
        cfg, done = re.subn(
            r"^instance_group .*$", f"instance_group [ {{ kind: {kind} }} ]", cfg, flags=re.M
        )
        if done != 1:
            raise SystemExit("model_repository/pets/config.pbtxt has no one-line instance_group")
        if name == "pets_all" and queue_delay_us is not None:
            cfg = set_queue_delay(cfg, queue_delay_us, "model_repository/pets/config.pbtxt")
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(cfg)
    return names


async def _measure(
    url: str, names: list[str], n: int, seq: int, rounds: int, warmup: int, seed: int
) -> dict[str, float]:
    """Seconds per round of each system over the first ``n`` tasks."""
    mod = client_module("grpc", aio=True)
    client = mod.InferenceServerClient(url)
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1000, 20000, size=seq) for _ in range(n)]
    inputs = [build_inputs(mod, names[k], ids=ids[k]) for k in range(n)]

    async def seqs() -> None:
        for k in range(n):
            await client.infer(f"task_{k}", inputs[k])

    async def pars() -> None:
        await asyncio.gather(*(client.infer(f"task_{k}", inputs[k]) for k in range(n)))

    async def pets() -> None:
        await asyncio.gather(*(client.infer("pets_all", inputs[k]) for k in range(n)))

    out = {}
    try:
        for name, fn in (("seqs", seqs), ("pars", pars), ("pets", pets)):
            for _ in range(warmup):
                await fn()
            t0 = time.perf_counter()
            for _ in range(rounds):
                await fn()
            out[name] = (time.perf_counter() - t0) / rounds
    finally:
        await client.close()
    return out


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--tasks", default=None, help="task counts (default 2,4,8,16)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per request (default 128)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30)")
    ap.add_argument("--quick", action="store_true", help="2 tasks, 16 tokens, 5 rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pet-types", default="all")
    ap.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="KIND_GPU float16 instances (default: when CUDA is available)",
    )
    ap.add_argument(
        "--queue-delay-us",
        type=int,
        default=2000,
        help="pets_all's dynamic-batcher max_queue_delay_microseconds, so one round's "
        "requests can meet in one execute (default 2000; the task models keep the "
        "shipped config's)",
    )
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    from clients.bench.results import add_out_argument

    add_out_argument(ap)


def run(args: argparse.Namespace, out: Run) -> dict[str, Any]:
    q = args.quick
    tasks_grid = parse_ints(args.tasks or ("2" if q else "2,4,8,16"))
    args.seq = args.seq or (16 if q else 128)
    args.rounds = args.rounds or (5 if q else 30)
    gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    try:  # before the repository and the 17-model server: fail in a second, not a minute
        client_module("grpc", aio=True)
    except ImportError as exc:
        raise SystemExit(
            f"fig8_online needs tritonclient[grpc] ({exc}); `make setup` installs it, an "
            "offline host takes its wheels from .whl/ (docs/deploy.md)"
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix="pets-f8-"))
    names = write_repository(
        tmp / "repo",
        args.model,
        max(tasks_grid),
        parse_types(args.pet_types),
        gpu,
        args.seed,
        args.queue_delay_us,
    )
    server = start_tritonserver(
        tmp / "repo",
        out.path("tritonserver.log"),
        extra=[
            "--disable-auto-complete-config",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--exit-timeout-secs=15",
        ],
        ready_s=args.ready_timeout,
    )
    url = server.grpc_url
    rows: list[dict[str, Any]] = []
    try:
        for n in tasks_grid:
            secs = asyncio.run(
                _measure(url, names, n, args.seq, args.rounds, args.warmup, args.seed)
            )
            for s in SYSTEMS:
                rows.append(
                    {
                        "tasks": n,
                        "bs": 1,
                        "seq_len": args.seq,
                        "system": s,
                        "instances": "KIND_GPU fp16" if gpu else "KIND_CPU fp32",
                        "pets_queue_delay_us": args.queue_delay_us,
                        "ms_per_round": round(secs[s] * 1e3, 3),
                        "seq_per_s": round(n / secs[s], 1),
                        "vs_seqs": round(secs["seqs"] / secs[s], 3),
                    }
                )
            print(
                f"fig8_online tasks={n}: "
                + ", ".join(f"{s} {n / secs[s]:.1f} seq/s" for s in SYSTEMS),
                flush=True,
            )
    finally:
        server.stop()
    out.write_csv("fig8_online.csv", rows)
    top = max(tasks_grid)
    by = {r["system"]: r for r in rows if r["tasks"] == top}
    ours = (
        f"served, {top} tasks x 1 x {args.seq}: pets {by['pets']['seq_per_s']:.0f} seq/s = "
        f"{by['pets']['vs_seqs']:.1f}x SeqS, "
        f"{by['pets']['seq_per_s'] / by['pars']['seq_per_s']:.1f}x ParS"
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    width = 0.8 / len(SYSTEMS)
    for j, s in enumerate(SYSTEMS):
        ys = [
            next(r["seq_per_s"] for r in rows if (r["tasks"], r["system"]) == (n, s))
            for n in tasks_grid
        ]
        xs = np.arange(len(tasks_grid)) + (j - 1) * width
        ax.bar(
            xs,
            ys,
            width,
            label={
                "seqs": "SeqS (model/task, serial)",
                "pars": "ParS (model/task, concurrent)",
                "pets": "pets",
            }[s],
        )
    ax.set_xticks(np.arange(len(tasks_grid)), [str(n) for n in tasks_grid])
    ax.set_xlabel("concurrent tasks")
    ax.set_ylabel("throughput (seq/s)")
    ax.legend(fontsize=7)
    ax.set_title(
        f"Fig. 8 served through Triton: {args.model}, "
        f"{'GPU fp16' if gpu else 'CPU fp32'}, seq {args.seq}",
        fontsize=9,
    )
    annotate(fig, PAPER, f"{ours}  [{TARGET}]")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(out.path("fig8_online.png"), dpi=130)
    plt.close(fig)
    return {"rows": rows, "claim": ours}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_args(ap)
    args = ap.parse_args(argv)
    with start_run("fig8_online", args.out, params=vars(args)) as out:
        out.update(claim=run(args, out)["claim"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
