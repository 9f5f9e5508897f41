"""MaskBERT's grouped masked product as a Triton kernel: the Hopper candidate (issue 18).

``seg_masked_mm`` (CUDA C++, WMMA on mma.sync) runs ``X_i (W * M_i).T`` at 135-154 TFLOP/s on
an H100 against cuBLAS's 580-730 on the same rows, and an mma.sync rewrite did not beat it
(docs/decisions.md). This kernel computes the same product with the operands swapped, each
output tile transposed::

    Y_i.T[n, m] = sum_k (W * M_i)[n, k] * X_i[m, k]

so the masked weight is the product's *left* operand, the one sm_90's wgmma takes from
registers: it is loaded and masked there (1 bit per weight, the words of
:func:`petops.reference.pack_mask_words`), while the token tile, the right operand, streams
through shared memory. In the sm_90 code Triton 3.6 makes of it, the masked tile still
crosses shared memory once between its load layout and the operand layout (Triton hoists
that conversion to the load only through arithmetic, and the mask is a select over
broadcast words). Whether that approaches cuBLAS is what ``clients/bench/masked_gemm.py``
measures; until it has, nothing in the engine calls this.

Same arguments and semantics as :func:`petops.reference.seg_masked_mm` (in place on ``y``).
The grid is one program per (output-column tile, item token tile); the item of a token tile is
found by a binary search over a prefix of tiles per item computed on the device, so a call
needs no host synchronisation and can be captured in a CUDA graph. Runs on the CPU under
``TRITON_INTERPRET=1`` (the tests' oracle check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .triton_aot import TRITON_TYPES, compile_kernel


@dataclass(frozen=True)
class MaskedConfig:
    """One tiling of the kernel. ``block_n`` output columns (the wgmma M side, 64 per
    warpgroup) by ``block_m`` tokens per tile, ``block_k`` columns of K per step (a multiple
    of 32: whole mask words), ``num_stages`` steps in flight."""

    block_n: int = 128
    block_m: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return (
            f"n{self.block_n}_m{self.block_m}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"
        )


CONFIGS = (
    MaskedConfig(),
    MaskedConfig(num_warps=8),
    MaskedConfig(block_n=64, num_stages=4),
    MaskedConfig(block_k=32, num_stages=4),
    MaskedConfig(block_n=256, num_warps=8),
    MaskedConfig(block_m=128, num_warps=8),
)
"""The tilings ``clients/bench/masked_gemm.py`` times (the first is the default)."""


@triton.jit
def _masked_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    mask_ptr,
    seg_ptr,
    item_seg_ptr,
    item_off_ptr,
    tile_prefix_ptr,
    alpha,
    n_items,
    n_out,
    k_dim,
    words_per_row,
    BN: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    unit = tl.program_id(1)
    total = tl.load(tile_prefix_ptr + n_items)
    if unit >= total:
        return
    # the item whose tiles hold `unit`: largest i with prefix[i] <= unit
    lo = n_items * 0
    hi = n_items  # prefix[lo] <= unit < prefix[hi]
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(tile_prefix_ptr + mid) <= unit
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    item = lo
    mask_off = tl.load(item_off_ptr + item)
    if mask_off < 0:  # the task has no mask at this site
        return
    seg = tl.load(item_seg_ptr + item)
    seg_end = tl.load(seg_ptr + seg + 1)
    row0 = tl.load(seg_ptr + seg) + (unit - tl.load(tile_prefix_ptr + item)) * BM

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = row0 + tl.arange(0, BM)
    n_ok = offs_n < n_out
    m_ok = offs_m < seg_end
    kk = tl.arange(0, BK)
    w_ptrs = w_ptr + offs_n[:, None] * k_dim + kk[None, :]  # [BN, BK]
    x_ptrs = x_ptr + offs_m[None, :] * k_dim + kk[:, None]  # [BK, BM]: X_i.T
    wd_ptrs = mask_ptr + mask_off + offs_n * words_per_row  # [BN]: each row's first word
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, k_dim, BK):
        if EVEN_K:  # no column masks: the loads stay 16-byte vectors (and pipelined)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            b = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & (k0 + kk[None, :] < k_dim), other=0.0)
            b = tl.load(x_ptrs, mask=m_ok[None, :] & (k0 + kk[:, None] < k_dim), other=0.0)
        # each column's mask word, picked from the row's BK / 32 words loaded as [BN]
        # vectors (a 3-D reshape of the words made Triton convert the tile's layout twice)
        word = tl.zeros((BN, BK), dtype=tl.int32)
        for j in tl.static_range(BK // 32):
            in_k = offs_n * 0 + k0 + 32 * j < k_dim  # a [BN] tensor, not a Python bool
            wj = tl.load(wd_ptrs + j, mask=n_ok & in_k, other=0)
            word = tl.where(kk[None, :] // 32 == j, wj[:, None], word)
        keep = ((word >> (kk[None, :] % 32)) & 1) != 0
        acc = tl.dot(tl.where(keep, w, tl.zeros_like(w)), b, acc, input_precision=PRECISION)
        w_ptrs += BK
        x_ptrs += BK
        wd_ptrs += BK // 32
    out = y_ptr + offs_m[None, :] * n_out + offs_n[:, None]  # Y.T tile
    ok = n_ok[:, None] & m_ok[None, :]
    prev = tl.load(out, mask=ok, other=0.0)
    tl.store(out, (prev.to(tl.float32) + alpha * acc).to(prev.dtype), mask=ok)


def seg_masked_mm(
    y: torch.Tensor,
    x: torch.Tensor,
    seg_indptr: torch.Tensor,
    item_seg: torch.Tensor,
    item_mask_off: torch.Tensor,
    mask: torch.Tensor,
    dense_w: torch.Tensor,
    alpha: float,
    config: MaskedConfig | None = None,
) -> None:
    """``y[rows_i] += alpha * x[rows_i] @ (dense_w * M_i).T`` for every item ``i``.

    Args:
        y: ``[T, N]`` contiguous, accumulated in place (fp16, bf16 or fp32).
        x: ``[T, K]`` contiguous, the dtype of ``y``.
        seg_indptr: int32 ``[S + 1]``; item_seg: int32 ``[I]``.
        item_mask_off: int64 ``[I]`` word offset of each item's mask, or -1 (no mask: adds
            nothing).
        mask: int32 words (:func:`petops.reference.pack_mask_words` per item).
        dense_w: ``[N, K]`` contiguous, the dtype of ``y``.
        alpha: scale of the product.
        config: the tiling (:data:`CONFIGS`); the default one when None.
    """
    cfg = config or CONFIGS[0]
    if cfg.block_k % 32:
        raise ValueError(f"MaskedConfig.block_k={cfg.block_k}; expected a multiple of 32")
    n_out, k_dim = dense_w.shape
    n_items = item_seg.numel()
    if y.numel() == 0 or n_items == 0 or k_dim == 0:
        return
    for name, t in (("y", y), ("x", x), ("dense_w", dense_w)):
        if not t.is_contiguous() or t.dtype != y.dtype:
            raise ValueError(
                f"masked_wgmma.seg_masked_mm: {name} is {t.dtype}, contiguous="
                f"{t.is_contiguous()}; expected a contiguous {y.dtype} tensor like y"
            )
    seg = item_seg.long()
    lengths = seg_indptr[seg + 1] - seg_indptr[seg]
    tiles = (lengths + cfg.block_m - 1) // cfg.block_m
    prefix = torch.zeros(n_items + 1, dtype=torch.int32, device=y.device)
    torch.cumsum(tiles, 0, out=prefix[1:])
    max_units = triton.cdiv(y.shape[0], cfg.block_m) + n_items  # bound on sum(tiles)
    grid = (triton.cdiv(n_out, cfg.block_n), max_units)
    _masked_kernel[grid](
        y,
        x,
        dense_w,
        mask,
        seg_indptr,
        item_seg,
        item_mask_off,
        prefix,
        float(alpha),
        n_items,
        n_out,
        k_dim,
        (k_dim + 31) // 32,
        BN=cfg.block_n,
        BM=cfg.block_m,
        BK=cfg.block_k,
        SEARCH_STEPS=max(1, n_items.bit_length()),
        EVEN_K=k_dim % cfg.block_k == 0,
        PRECISION="ieee" if y.dtype == torch.float32 else "tf32",  # fp32 stays fp32
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def compile_for(
    config: MaskedConfig, arch: int = 90, dtype: torch.dtype = torch.float16
) -> dict[str, Any]:
    """The kernel compiled ahead of time for compute capability ``arch`` in ``config``'s
    tiling (:func:`petops.triton_aot.compile_kernel`; no GPU needed)."""
    el = TRITON_TYPES[dtype]
    ptrs = {"y_ptr": el, "x_ptr": el, "w_ptr": el, "mask_ptr": "i32", "seg_ptr": "i32"}
    ptrs |= {"item_seg_ptr": "i32", "item_off_ptr": "i64", "tile_prefix_ptr": "i32"}
    signature = {name: "*" + t for name, t in ptrs.items()}
    signature |= {"alpha": "fp32", "n_items": "i32", "n_out": "i32", "k_dim": "i32"}
    signature |= {"words_per_row": "i32"}
    constexprs = {
        "BN": config.block_n,
        "BM": config.block_m,
        "BK": config.block_k,
        "SEARCH_STEPS": 8,
        "EVEN_K": True,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    aligned = [*ptrs, "n_out", "k_dim"]
    return compile_kernel(
        _masked_kernel, signature, constexprs, aligned, config.num_warps, config.num_stages, arch
    )
