"""In-process engine throughput: the ceiling the Triton server is measured against.

For one backbone/dtype/device, times one engine forward of ``--batch`` sequences of
``--seq-len`` tokens spread over ``--tasks`` tasks, for: the backbone alone (``none`` tasks:
shared ops + epilogues, no shadow work), each PET type alone, and a uniform mix of all
types (every registered type, :func:`pets.pet.pet_types`); with the grouped ops, and optionally
PetS's multi-stream mode. Prints CSV and writes ``engine_bench.csv`` / ``engine_bench.json`` to
a dated run folder under ``--out`` (``clients/bench/results.py``). On CUDA, ``--profile`` adds the
device time of one forward (``gpu_ms_per_batch``, the sum of its kernels: far below
``ms_per_batch`` means the forward is bound by host dispatch) and writes each config's kernels
to ``engine_kernels.csv``.

    python -m clients.bench.bench_engine --backbone bert-base --device cuda:0 --dtype float16
    python -m clients.bench.bench_engine --backbone bert-base --tasks 64 --profile \
        --configs backbone_only,diff_pruning,mixed     # a quick A/B: fewer tasks to load
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch

from clients.bench.results import add_out_argument, start_run
from clients.pets_client import parse_subset
from pets.engine import Engine
from pets.pet import pet_types
from pets.profiling import EngineProbe, time_fn

# Every registered PET type but "none" (the backbone alone, timed as "backbone_only").
MIX = tuple(sorted(t for t in pet_types() if t != "none"))
# Config label -> the PET types its batch draws tasks from.
CONFIGS: dict[str, list[str]] = {
    "backbone_only": ["none"],
    **{t: [t] for t in MIX},
    "mixed": list(MIX),
}


def parse_configs(text: str) -> list[str]:
    """``--configs``: comma-separated labels of :data:`CONFIGS`, or ``all``."""
    return parse_subset(text, list(CONFIGS), "--configs")


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    if args.profile:
        from clients.bench.op_kernels import kernel_times  # torch.profiler; only when asked
    rows, kernels = [], []
    for streams in args.streams:
        store = tempfile.mkdtemp(prefix="pets-bench-")
        engine = Engine.from_parameters(
            {
                "BACKBONE": args.backbone,
                "TASK_STORE": store,
                "DTYPE": args.dtype,
                "OPS": args.ops,
                "SHADOW_STREAMS": str(streams),
                **args.params,
            },
            device=args.device,
        )
        configs = {k: v for k, v in CONFIGS.items() if k in args.configs}
        needed = tuple(t for t in ("none", *MIX) if any(t in v for v in configs.values()))
        t0 = time.perf_counter()
        probe = EngineProbe(engine, tasks_per_type=args.tasks, types=needed)
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        ids = [rng.integers(1000, engine.spec.vocab, size=args.seq_len) for _ in range(args.batch)]
        base = None
        for label, types in configs.items():
            types = [t for t in types if t in probe.slots]
            if not types:
                continue
            pool = [pool_slot for t in types for pool_slot in probe.slots[t]]
            pool = [pool[i] for i in rng.permutation(len(pool))]
            slots = [pool[i % len(pool)] for i in range(args.batch)]
            distinct = len(set(slots))
            batch = engine.encoder.batch(ids, slots)
            sec = time_fn(
                lambda b=batch, e=engine: e.encoder.forward(b),
                engine.device,
                warmup=3,
                repeat=args.iters,
            )
            gpu_ms = None
            if args.profile and engine.device.type == "cuda":
                per_kernel = kernel_times(lambda b=batch, e=engine: e.encoder.forward(b), 3)
                gpu_ms = round(sum(us for _, us in per_kernel.values()) / 1e3, 3)
                for name, (n, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
                    kernels.append(
                        {
                            "shadow_streams": streams,
                            "config": label,
                            "kernel": name[:90],
                            "launches_per_batch": round(n, 2),
                            "us_per_batch": round(us, 2),
                        }
                    )
            seq_s = args.batch / sec
            base = seq_s if label == "backbone_only" else base
            rows.append(
                {
                    "backbone": args.backbone,
                    "device": _device_name(engine.device),
                    "dtype": args.dtype,
                    "ops": engine.ops,
                    "shadow_streams": streams,
                    "params": " ".join(f"{k}={v}" for k, v in args.params.items()),
                    "config": label,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "distinct_tasks": distinct,
                    "ms_per_batch": round(sec * 1e3, 3),
                    "gpu_ms_per_batch": gpu_ms,
                    "seq_per_s": round(seq_s, 1),
                    "vs_backbone": round(seq_s / base, 3) if base else None,
                    "task_load_s": round(load_s, 2),
                }
            )
            print(",".join(str(v) for v in rows[-1].values()), flush=True)
        engine.close()
        del engine, probe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows, kernels


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="default")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ops", default="auto")
    p.add_argument("--tasks", type=int, default=11, help="tasks per PET type")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--configs",
        default="all",
        help="comma-separated configs to time (backbone_only, a PET type, mixed); only their "
        "types' tasks are loaded (default all)",
    )
    p.add_argument(
        "--streams",
        type=int,
        nargs="+",
        default=[0],
        help="SHADOW_STREAMS values to compare (0 = grouped ops)",
    )
    p.add_argument("--profile", action="store_true", help="CUDA: add per-kernel device time")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra engine parameter, repeatable (e.g. MASKBERT_FORMAT=index)",
    )
    add_out_argument(p)
    args = p.parse_args()
    args.params = dict(kv.split("=", 1) for kv in args.param)
    args.configs = parse_configs(args.configs)
    with start_run("bench_engine", args.out, params=vars(args)) as out:
        rows, kernels = run(args)
        out.write_csv("engine_bench.csv", rows)
        out.write_json("engine_bench.json", rows)
        if kernels:
            out.write_csv("engine_kernels.csv", kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
