"""Per-kernel GPU time of the backbone forward, grouped by kind, against HF ``BertModel``.

Runs the engine eagerly (CUDA graphs off, so every launch is seen by the profiler) over
backbone-only tasks at each ``B x L`` shape, and sorts every CUDA kernel of one forward into
a kind: ``gemm`` (cuBLAS/CUTLASS matrix products), ``attention`` (SDPA / flash kernels),
``layernorm``, ``epilogue`` (bias, activation, residual and other elementwise work),
``layout`` (copies, transposes, gathers), ``pet`` (petops shadow kernels) or ``other``. The
sum of kernel times is the forward's GPU time; its TFLOP/s share of the card's dense peak is
the figure issue 23 targets. The same shapes through HF ``BertModel`` (fp16, SDPA, padded
``[B, L]``, random weights of the same config) are timed in the same process with CUDA events.

Writes ``kernels.csv`` (one row per shape x kernel), ``summary.csv`` (one row per shape x
kind, plus totals) and ``breakdown.png`` (stacked bars) into a dated run folder
(clients/bench/results.py).

    python -m clients.bench.backbone_kernels --backbone bert-base --shapes 256x64,64x64,1x128
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.bench.op_kernels import kernel_times
from clients.bench.results import add_out_argument, pyplot, start_run
from pets.backbone import BackboneSpec, hf_config, load_backbone
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.taskgen import random_task

KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"fmha|flash|attention|attn", re.I)),
    ("layernorm", re.compile(r"layer_?norm|adapter_ln", re.I)),
    ("epilogue", re.compile(r"bias_act", re.I)),
    ("pet", re.compile(r"sgmv|seg_masked|seg_spmm", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|wgmma|sm\d+_", re.I)),
    ("layout", re.compile(r"copy|transpose|cat|gather|scatter|index|permute|fill", re.I)),
    ("epilogue", re.compile(r"elementwise|vectorized|gelu|add|mul|act|bias|where", re.I)),
)
"""Kernel name -> kind, first match wins. The petops epilogues (``bias_act``, the fused
residual + LayerNorm ``adapter_ln``/``bias_residual_layernorm``) count as epilogue and
layernorm work; its grouped shadow products (``sgmv``, ``seg_*``) as ``pet``."""

DENSE_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense fp16/bf16 tensor-core peak by card family (NVIDIA data sheets, SXM parts)."""


def kind_of(name: str) -> str:
    """The kind of a CUDA kernel from its (demangled) name."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def forward_flops(spec: BackboneSpec, batch: int, seq_len: int) -> float:
    """Matrix-product FLOPs of one forward over ``batch`` sequences of ``seq_len`` tokens.

    Linear layers: ``2 * T * (4 H^2 + 2 H F)`` per layer; attention: ``4 * B * L^2 * H`` per
    layer (QK^T and PV).
    """
    h, f, tokens = spec.hidden, spec.ffn, batch * seq_len
    linear = 2.0 * tokens * (4 * h * h + 2 * h * f)
    attention = 4.0 * batch * seq_len * seq_len * h
    return spec.layers * (linear + attention)


def peak_tflops() -> float | None:
    """The current card's dense fp16 peak, when it is a known family."""
    name = torch.cuda.get_device_name()
    for family, peak in DENSE_PEAK_TFLOPS.items():
        if family in name:
            return peak
    return None


def hf_forward_ms(spec: BackboneSpec, batch: int, seq_len: int, iters: int) -> float:
    """CUDA-event time of HF ``BertModel`` (fp16, SDPA) over a ``[batch, seq_len]`` input."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**hf_config(spec), attn_implementation="sdpa")
    model = BertModel(cfg, add_pooling_layer=False).to("cuda", torch.float16).eval()
    ids = torch.randint(1000, 30000, (batch, seq_len), device="cuda")
    mask = torch.ones_like(ids)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        start.record()
        for _ in range(iters):
            model(input_ids=ids, attention_mask=mask)
        end.record()
        end.synchronize()
    del model
    torch.cuda.empty_cache()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="bert-base")
    ap.add_argument("--shapes", default="256x64,64x64,1x128")
    ap.add_argument("--tasks", type=int, default=64, help="backbone-only tasks in the batch")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF BertModel comparison")
    add_out_argument(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("backbone_kernels needs a CUDA device (it profiles GPU kernels)")
    run = start_run("backbone_kernels", args.out, params=vars(args))
    store = run.path("empty_store/.keep").parent
    weights = load_backbone(args.backbone)
    params = {"BACKBONE": args.backbone, "TASK_STORE": str(store), "DTYPE": "float16"}
    engine = Engine.from_parameters(
        {**params, "REFRESH_MS": "0", "CUDA_GRAPHS": "0"}, device="cuda:0"
    )
    names = []
    for i in range(args.tasks):
        m, t = random_task(weights, f"b{i}", "none", HeadConfig("embedding"), seed=i)
        engine.registry.add(m, t)
        names.append(f"b{i}")
    spec, peak = weights.spec, peak_tflops()
    rng = np.random.default_rng(0)
    kernel_rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        b, length = (int(v) for v in shape.split("x"))
        ids = [rng.integers(1000, 30000, size=length) for _ in range(b)]
        tasks = [names[i % len(names)] for i in range(b)]
        kernels = kernel_times(lambda i=ids, t=tasks: engine.run(i, t), args.iters)
        by_kind: dict[str, float] = defaultdict(float)
        for name, (launches, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
            kind = kind_of(name)
            by_kind[kind] += us
            kernel_rows.append(
                {
                    "shape": shape,
                    "kind": kind,
                    "kernel": name[:160],
                    "launches": launches,
                    "us": round(us, 2),
                }
            )
        gpu_ms = sum(by_kind.values()) / 1e3
        tflops = forward_flops(spec, b, length) / (gpu_ms * 1e-3) / 1e12
        row: dict[str, Any] = {
            "shape": shape,
            "gpu_ms": round(gpu_ms, 3),
            "tflops": round(tflops, 1),
        }
        row["peak_share"] = round(tflops / peak, 3) if peak else None
        row.update({f"{k}_ms": round(v / 1e3, 3) for k, v in sorted(by_kind.items())})
        if not args.no_hf:
            hf_ms = hf_forward_ms(spec, b, length, args.iters)
            row["hf_ms"] = round(hf_ms, 3)
            row["hf_tflops"] = round(forward_flops(spec, b, length) / (hf_ms * 1e-3) / 1e12, 1)
        print(json.dumps(row), flush=True)
        summary.append(row)
    engine.close()
    store.rmdir()
    run.write_csv("kernels.csv", kernel_rows)
    run.write_csv("summary.csv", summary)
    _plot(summary, run.path("breakdown.png"), torch.cuda.get_device_name())
    run.finish()


def _plot(summary: list[dict[str, Any]], path: Path, device: str) -> None:
    plt = pyplot()
    kinds = sorted({k[:-3] for row in summary for k in row if k.endswith("_ms")} - {"gpu", "hf"})
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(summary))
    bottom = np.zeros(len(summary))
    for kind in kinds:
        share = np.array([row.get(f"{kind}_ms", 0.0) / row["gpu_ms"] for row in summary])
        ax.bar(x, share * 100, bottom=bottom * 100, label=kind)
        bottom += share
    ax.set_xticks(x, [f"{r['shape']}\n{r['tflops']} TFLOP/s" for r in summary])
    ax.set_ylabel("% of forward GPU time")
    ax.set_title(f"backbone forward by kernel kind ({device})")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
