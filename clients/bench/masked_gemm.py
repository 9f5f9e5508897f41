"""MaskBERT's grouped masked product against the shared GEMM it stands in for (CUDA only).

A MaskBERT token skips the shared GEMM and takes ``seg_masked_mm`` (``X_i (W * M_i).T`` with
``W`` masked on the fly), so the closer that op runs to cuBLAS on the same rows, the closer
MaskBERT comes to the backbone's cost. For each bert-base linear site shape (``N x K``) and each
grouping (items x tokens per item) this times, per call of ``--iters`` replayed back to back
from a CUDA graph:

* ``cublas_us``: ``torch.mm`` of all rows with the shared ``W`` (what backbone-only tokens pay);
* ``masked_us``: ``seg_masked_mm`` of the same rows, one mask per item (``--keep`` of the
  weights kept), accumulating into ``y``;
* ``triton_us``: the Triton candidate (:mod:`petops.masked_wgmma`, wgmma on sm_90) at its
  fastest tiling of :data:`petops.masked_wgmma.CONFIGS` (``triton_config``,
  ``triton_over_ref`` its time over ``masked_us``), each tiling first checked against
  ``seg_masked_mm``'s output (``triton_max_err``; :mod:`clients.bench.tilings`); skipped with
  ``--no-triton`` or where Triton is not installed. Every tiling's time goes to
  ``triton_configs.csv``;

and prints one JSON line per point (with TFLOP/s and ``masked / cublas``), writing them as
``masked_gemm.csv`` to a dated run folder under ``--out``.

    python -m clients.bench.masked_gemm --groups 16x1024,64x64,256x64
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from typing import Any

import torch

import petops
from clients.bench.results import add_out_argument, start_run
from clients.bench.tilings import Tiling, best, gpu_us, time_tilings
from clients.pets_client import parse_point
from petops import ops
from petops.reference import pack_mask_words

SITES = {"qkv": (2304, 768), "attn_out": (768, 768), "ffn_in": (3072, 768), "ffn_out": (768, 3072)}


def parse_groups(text: str) -> list[tuple[int, int]]:
    """``"16x1024,64x64"`` -> ``[(16, 1024), (64, 64)]`` (items, tokens per item), read with
    :func:`clients.pets_client.parse_point`; a drawn length (``LO:HI``) is refused."""
    out = []
    for part in text.split(","):
        items, tokens = parse_point(part, "--groups")
        if not tokens.isdigit():
            raise SystemExit(f"--groups entry {part!r}: tokens per item must be one number")
        out.append((items, int(tokens)))
    return out


def point(
    n: int,
    k: int,
    items: int,
    tokens: int,
    keep: float,
    iters: int,
    g: torch.Generator,
    with_triton: bool = True,
) -> tuple[dict[str, Any], list[Tiling]]:
    """One (site shape, grouping) point (see the module docstring), and the Triton
    candidate's tilings (empty without it)."""
    dev, dt = torch.device("cuda"), torch.float16
    rows = items * tokens
    x = torch.randn(rows, k, generator=g).to(dev, dt)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dev, dt)
    y = torch.zeros(rows, n, device=dev, dtype=dt)
    words = torch.cat([pack_mask_words(torch.rand(n, k, generator=g) < keep) for _ in range(items)])
    per = words.numel() // items
    indptr = torch.arange(0, rows + 1, tokens, dtype=torch.int32, device=dev)
    item_seg = torch.arange(items, dtype=torch.int32, device=dev)
    offs = torch.arange(items, dtype=torch.int64, device=dev) * per
    words = words.to(dev)
    cublas = gpu_us(lambda: torch.mm(x, w.T, out=y), iters)
    masked = gpu_us(lambda: ops.seg_masked_mm(y, x, indptr, item_seg, offs, words, w, 1.0), iters)
    flop = 2.0 * rows * n * k
    row: dict[str, Any] = {
        "cublas_us": round(cublas, 2),
        "masked_us": round(masked, 2),
        "cublas_tflops": round(flop / cublas / 1e6, 1),
        "masked_tflops": round(flop / masked / 1e6, 1),
        "masked_over_cublas": round(masked / cublas, 3),
    }
    if not with_triton:
        return row, []
    from petops import masked_wgmma

    def run(cfg: masked_wgmma.MaskedConfig) -> torch.Tensor:
        masked_wgmma.seg_masked_mm(y, x, indptr, item_seg, offs, words, w, 1.0, config=cfg)
        return y

    y.zero_()
    ops.seg_masked_mm(y, x, indptr, item_seg, offs, words, w, 1.0)
    tilings = time_tilings(masked_wgmma.CONFIGS, run, y.clone(), iters, reset=y.zero_)
    return row | best(tilings, flop, masked), tilings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="16x1024,64x64,256x64", help="ITEMSxTOKENS,...")
    p.add_argument("--sites", default=",".join(SITES), help=f"subset of {', '.join(SITES)}")
    p.add_argument("--keep", type=float, default=0.95, help="share of weights each mask keeps")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--no-triton", action="store_true", help="skip the Triton candidate")
    add_out_argument(p)
    a = p.parse_args()
    if not torch.cuda.is_available() or "cuda" not in petops.compiled_devices("seg_masked_mm"):
        raise SystemExit("masked_gemm needs a CUDA GPU and libpetops.so built with CUDA kernels")
    with_triton = not a.no_triton and importlib.util.find_spec("triton") is not None
    run = start_run("masked_gemm", a.out, params=vars(a))
    g = torch.Generator().manual_seed(0)
    rows, configs = [], []
    for items, tokens in parse_groups(a.groups):
        for site in a.sites.split(","):
            n, k = SITES[site]
            where = {"items": items, "tokens_per_item": tokens, "site": site, "n": n, "k": k}
            row, tilings = point(n, k, items, tokens, a.keep, a.iters, g, with_triton)
            print(json.dumps(where | row), flush=True)
            rows.append(where | row)
            configs += [where | dataclasses.asdict(t) for t in tilings]
    run.write_csv("masked_gemm.csv", rows)
    if configs:
        run.write_csv("triton_configs.csv", configs)
    run.finish()


if __name__ == "__main__":
    main()
