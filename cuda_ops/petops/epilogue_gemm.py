"""The shared GEMM with each segment's own bias, activation and IA3 scale in its epilogue.

Backbone-only batches take their bias (and at the FFN input the GELU) in cuBLASLt's GEMM
epilogue, but cuBLASLt's bias is one vector for every row: a batch whose tasks bring their
own biases (BitFit) or output scales (IA3) takes a plain GEMM and then ``bias_act``, a second
pass that reads and writes the whole ``[T, N]`` output. On an H100 that made 64 BitFit tasks
x 64 tokens 25% slower than the backbone (docs/performance.md). Issue 23 asks for a GEMM whose
epilogue reads a bias and a scale per row segment; this is that GEMM, in Triton::

    y = act(x @ w.T + bias[seg_bias[seg(t)]]) * scale[seg_scale[seg(t)]]     (row t)

the semantics of ``bias_act(x @ w.T, ...)`` (:func:`petops.reference.bias_act`) with the
product kept in fp32 until the epilogue has run. A tile finds its rows' segments by a binary
search over ``seg_indptr``, so no per-token table is built. Not yet called by the engine:
``clients/bench/epilogue_gemm.py`` times it against cuBLAS + ``bias_act`` and against the
cuBLASLt epilogue it would have to match. Runs on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .reference import ACT_GELU, ACT_GELU_TANH, ACT_NONE, ACT_RELU, ACT_SILU
from .triton_aot import TRITON_TYPES, compile_kernel


@dataclass(frozen=True)
class GemmConfig:
    """One tiling: ``block_m`` tokens x ``block_n`` output columns per program, ``block_k``
    columns of K per step, ``group_m`` row tiles walked together (L2 reuse of ``w``)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __str__(self) -> str:
        return (
            f"m{self.block_m}_n{self.block_n}_k{self.block_k}_g{self.group_m}"
            f"_w{self.num_warps}_s{self.num_stages}"
        )


CONFIGS = (
    GemmConfig(),
    GemmConfig(num_stages=4),
    GemmConfig(block_k=32, num_stages=4),
    GemmConfig(block_m=64, num_warps=4, num_stages=4),
    GemmConfig(block_n=64, num_warps=4, num_stages=4),
    GemmConfig(block_m=64, block_n=64, num_warps=4, num_stages=4),
)
"""The tilings ``clients/bench/epilogue_gemm.py`` times (the first is the default). 128 x 256 tiles
(8 warps) and 128 x 128 tiles on 4 warps spilled: the epilogue's gathers on top of 128
accumulators a thread."""


# the ACT_* codes as compile-time values the kernel may read
_GELU = tl.constexpr(ACT_GELU)
_RELU = tl.constexpr(ACT_RELU)
_SILU = tl.constexpr(ACT_SILU)
_GELU_TANH = tl.constexpr(ACT_GELU_TANH)


@triton.jit
def _act(v, ACT: tl.constexpr):
    """An ``ACT_*`` activation of the fp32 tile ``v`` (petops.reference.apply_act)."""
    if ACT == _GELU:  # exact (erf)
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == _RELU:
        v = tl.maximum(v, 0.0)
    elif ACT == _SILU:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == _GELU_TANH:  # tanh(u) = 2 / (1 + exp(-2u)) - 1
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (2.0 / (1.0 + tl.exp(-2.0 * u)))
    return v


@triton.jit
def _gemm_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    scale_ptr,
    seg_ptr,
    seg_bias_ptr,
    seg_scale_ptr,
    n_tok,
    n_out,
    k_dim,
    n_seg,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ACT: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # row tiles walked GROUP_M at a time down each column of tiles: w's tiles stay in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(n_tok, BM)
    tiles_n = tl.cdiv(n_out, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < n_tok
    col_ok = cols < n_out
    kk = tl.arange(0, BK)
    x_ptrs = x_ptr + rows[:, None] * k_dim + kk[None, :]  # [BM, BK]
    w_ptrs = w_ptr + cols[None, :] * k_dim + kk[:, None]  # [BK, BN]: w.T
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, k_dim, BK):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=row_ok[:, None] & (k0 + kk[None, :] < k_dim), other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :] & (k0 + kk[:, None] < k_dim), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BK
        w_ptrs += BK

    # each row's segment: the largest s with seg_indptr[s] <= row (a search per row)
    lo = tl.zeros((BM,), dtype=tl.int32)
    hi = tl.zeros((BM,), dtype=tl.int32) + n_seg  # seg_indptr[lo] <= row < seg_indptr[hi]
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(seg_ptr + mid) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    ok = row_ok[:, None] & col_ok[None, :]
    slot = tl.load(seg_bias_ptr + lo, mask=row_ok, other=0)
    bias = tl.load(bias_ptr + slot[:, None] * n_out + cols[None, :], mask=ok, other=0.0)
    v = _act(acc + bias.to(tl.float32), ACT)
    if HAS_SCALE:
        sslot = tl.load(seg_scale_ptr + lo, mask=row_ok, other=0)
        v *= tl.load(scale_ptr + sslot[:, None] * n_out + cols[None, :], mask=ok, other=1.0).to(
            tl.float32
        )
    tl.store(y_ptr + rows[:, None] * n_out + cols[None, :], v.to(y_ptr.dtype.element_ty), mask=ok)


_ACTS = (ACT_NONE, ACT_GELU, ACT_RELU, ACT_SILU, ACT_GELU_TANH)


def gemm_bias_act(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_bias: torch.Tensor,
    scale: torch.Tensor | None,
    seg_scale: torch.Tensor | None,
    act: int,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """``bias_act(x @ w.T, bias, seg_indptr, seg_bias, scale, seg_scale, act)`` in one kernel.

    Args:
        x: ``[T, K]`` contiguous (fp16, bf16 or fp32).
        w: ``[N, K]`` contiguous, the dtype of ``x``.
        bias: ``[P, N]`` bias pool; seg_bias: int32 ``[S]`` its row per segment.
        seg_indptr: int32 ``[S + 1]``, covering the ``T`` rows.
        scale: optional ``[Q, N]`` scale pool (IA3); seg_scale: int32 ``[S]`` its rows.
        act: an ``ACT_*`` code of :mod:`petops.reference`.
        config: the tiling (:data:`CONFIGS`); the default one when None.

    Returns:
        ``[T, N]`` in the dtype of ``x``.
    """
    cfg = config or CONFIGS[0]
    n_tok, k_dim = x.shape
    n_out = w.shape[0]
    if act not in _ACTS:
        raise ValueError(f"act={act}; expected one of the ACT_* codes {_ACTS}")
    if (scale is None) != (seg_scale is None):
        raise ValueError("scale and seg_scale come together: give both or neither")
    for name, t in (("x", x), ("w", w), ("bias", bias), ("scale", scale)):
        if t is not None and (not t.is_contiguous() or t.dtype != x.dtype):
            raise ValueError(
                f"epilogue_gemm: {name} is {t.dtype}, contiguous={t.is_contiguous()}; expected "
                f"a contiguous {x.dtype} tensor like x"
            )
    if w.shape[1] != k_dim or bias.shape[1] != n_out:
        raise ValueError(
            f"epilogue_gemm: x {tuple(x.shape)}, w {tuple(w.shape)}, bias "
            f"{tuple(bias.shape)}; expected w [N, K] and bias [P, N] for x [T, K]"
        )
    y = torch.empty(n_tok, n_out, dtype=x.dtype, device=x.device)
    if n_tok == 0 or n_out == 0:
        return y
    n_seg = seg_bias.numel()
    grid = (triton.cdiv(n_tok, cfg.block_m) * triton.cdiv(n_out, cfg.block_n),)
    _gemm_kernel[grid](
        y,
        x,
        w,
        bias,
        bias if scale is None else scale,  # not read without HAS_SCALE
        seg_indptr,
        seg_bias,
        seg_bias if seg_scale is None else seg_scale,
        n_tok,
        n_out,
        k_dim,
        n_seg,
        BM=cfg.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        GROUP_M=cfg.group_m,
        SEARCH_STEPS=max(1, n_seg.bit_length()),
        HAS_SCALE=scale is not None,
        ACT=act,
        EVEN_K=k_dim % cfg.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def compile_for(
    config: GemmConfig,
    arch: int = 90,
    dtype: torch.dtype = torch.float16,
    act: int = ACT_GELU,
    has_scale: bool = True,
) -> dict[str, Any]:
    """The kernel compiled ahead of time for compute capability ``arch`` in ``config``'s
    tiling (:func:`petops.triton_aot.compile_kernel`; no GPU needed)."""
    el = TRITON_TYPES[dtype]
    ptrs = {"y_ptr": el, "x_ptr": el, "w_ptr": el, "bias_ptr": el, "scale_ptr": el}
    ptrs |= {"seg_ptr": "i32", "seg_bias_ptr": "i32", "seg_scale_ptr": "i32"}
    signature = {name: "*" + t for name, t in ptrs.items()}
    signature |= {"n_tok": "i32", "n_out": "i32", "k_dim": "i32", "n_seg": "i32"}
    constexprs = {
        "BM": config.block_m,
        "BN": config.block_n,
        "BK": config.block_k,
        "GROUP_M": config.group_m,
        "SEARCH_STEPS": 7,
        "HAS_SCALE": has_scale,
        "ACT": act,
        "EVEN_K": True,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    aligned = [*ptrs, "n_out", "k_dim"]
    return compile_kernel(
        _gemm_kernel, signature, constexprs, aligned, config.num_warps, config.num_stages, arch
    )
