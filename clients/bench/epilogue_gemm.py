"""Per-segment biases and scales inside the shared GEMM, against the two passes they take now
(CUDA only; issue 23: "so BitFit and IA3 stay free").

For the two sites whose output goes through ``bias_act`` (bert-base ``qkv`` 2304 x 768, no
activation, and ``ffn_in`` 3072 x 768, GELU), each ``BxL`` point (``B`` sequences of ``L``
tokens, one segment per sequence over ``--tasks`` bias slots, IA3 scales with ``--scales``)
times, per call, replayed from a CUDA graph:

* ``lt_us``: the GEMM with one bias for every row in cuBLASLt's epilogue (and the GELU at
  ``ffn_in``): what a backbone-only batch pays, the bound to reach;
* ``split_us``: ``torch.mm`` and then ``bias_act`` with the segments' biases (and scales):
  what a BitFit or IA3 batch pays today;
* ``triton_us``: :func:`petops.epilogue_gemm.gemm_bias_act` at its fastest tiling
  (``triton_config``), each tiling first checked against the split path's output.

One JSON line per point; ``epilogue_gemm.csv`` and every tiling's time in
``triton_configs.csv`` go to a dated run folder under ``--out``.

    python -m clients.bench.epilogue_gemm --points 256x64,64x64,8x64,1x128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import torch

import petops
from clients.bench.results import add_out_argument, start_run
from clients.bench.tilings import Tiling, best, gpu_us, time_tilings
from clients.pets_client import parse_point
from petops import ops
from petops.reference import ACT_GELU, ACT_NONE

SITES = {"qkv": (2304, 768, ACT_NONE), "ffn_in": (3072, 768, ACT_GELU)}


def point(
    site: str, seqs: int, length: int, tasks: int, scales: bool, iters: int, g: torch.Generator
) -> tuple[dict[str, Any], list[Tiling]]:
    """One (site, point): the three timings of the module docstring and the tilings."""
    from petops import epilogue_gemm

    n, k, act = SITES[site]
    dev, dt = torch.device("cuda"), torch.float16
    rows = seqs * length
    x = torch.randn(rows, k, generator=g).to(dev, dt)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dev, dt)
    bias = (torch.randn(tasks, n, generator=g) * 0.1).to(dev, dt)
    indptr = torch.arange(0, rows + 1, length, dtype=torch.int32, device=dev)
    seg_bias = torch.randint(0, tasks, (seqs,), generator=g, dtype=torch.int32).to(dev)
    scale = (torch.rand(tasks, n, generator=g) + 0.5).to(dev, dt) if scales else None
    seg_scale = seg_bias if scales else None
    y = torch.empty(rows, n, device=dev, dtype=dt)

    def shared() -> None:
        if act == ACT_GELU:
            torch._addmm_activation(bias[0], x, w.t(), use_gelu=True)
        else:
            torch.addmm(bias[0], x, w.t(), out=y)

    def split() -> torch.Tensor:
        torch.mm(x, w.t(), out=y)
        return ops.bias_act(y, bias, indptr, seg_bias, scale, seg_scale, act)

    lt, two = gpu_us(shared, iters), gpu_us(split, iters)
    flop = 2.0 * rows * n * k
    row: dict[str, Any] = {
        "lt_us": round(lt, 2),
        "split_us": round(two, 2),
        "lt_tflops": round(flop / lt / 1e6, 1),
        "split_over_lt": round(two / lt, 3),
    }
    tilings = time_tilings(
        epilogue_gemm.CONFIGS,
        lambda cfg: epilogue_gemm.gemm_bias_act(
            x, w, bias, indptr, seg_bias, scale, seg_scale, act, config=cfg
        ),
        split().clone(),
        iters,
    )
    row |= best(tilings, flop, two)
    if "triton_us" in row:
        row["triton_over_lt"] = round(row["triton_us"] / lt, 3)
    return row, tilings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="256x64,64x64,8x64,1x128", help="SEQSxTOKENS,...")
    p.add_argument("--sites", default=",".join(SITES), help=f"subset of {', '.join(SITES)}")
    p.add_argument("--tasks", type=int, default=64, help="bias (and scale) slots")
    p.add_argument("--scales", action="store_true", help="IA3 scales on every segment")
    p.add_argument("--iters", type=int, default=50)
    add_out_argument(p)
    a = p.parse_args()
    if not torch.cuda.is_available() or "cuda" not in petops.compiled_devices("bias_act"):
        raise SystemExit("epilogue_gemm needs a CUDA GPU and libpetops.so built with CUDA kernels")
    run = start_run("epilogue_gemm", a.out, params=vars(a))
    g = torch.Generator().manual_seed(0)
    rows, configs = [], []
    for spec in a.points.split(","):
        seqs, tokens = parse_point(spec, "--points")
        if not tokens.isdigit():
            raise SystemExit(f"--points entry {spec!r}: tokens per sequence must be one number")
        for site in a.sites.split(","):
            where = {"point": spec, "site": site, "tasks": a.tasks, "scales": a.scales}
            row, tilings = point(site, seqs, int(tokens), a.tasks, a.scales, a.iters, g)
            print(json.dumps(where | row), flush=True)
            rows.append(where | row)
            configs += [where | dataclasses.asdict(t) for t in tilings]
    run.write_csv("epilogue_gemm.csv", rows)
    run.write_csv("triton_configs.csv", configs)
    run.finish()


if __name__ == "__main__":
    main()
