"""Typed entry points of the petops library.

Every function has the signature of its spec in :mod:`petops.reference` and dispatches to
``torch.ops.petops.<op>`` when the compiled library is loaded and has a kernel for the
tensors' device, else to the reference. To run the references everywhere, call
:mod:`petops.reference` itself (the engine's ``OPS=reference``).

Compiled-kernel preconditions beyond the reference (caller contracts of the engine):
``sgmv_expand`` items that share a segment must write disjoint ``y`` column ranges (q/k/v
blocks), and ``seg_spmm`` / ``seg_masked_mm`` give each segment at most one item; the CUDA
kernels update ``y`` without atomics. The CUDA kernels take at most 4096 items per call and
ranks <= 128 in ``sgmv_shrink``; data-dependent offsets are validated on CPU only (no host
sync on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from . import compiled_available, compiled_devices
from . import reference as ref

OP_NAMES = (
    "bias_act",
    "bias_residual_layernorm",
    "sgmv_shrink",
    "sgmv_expand",
    "adapter_residual_layernorm",
    "seg_spmm",
    "seg_masked_mm",
)
_F = TypeVar("_F", bound=Callable)


def backend_description() -> str:
    """What is loaded, for the engine's log, e.g. ``"compiled[cpu,cuda]"`` or
    ``"reference (<why>)"``."""
    from . import backend_name

    return backend_name()


def _call(op: str, device: torch.device, *args: Any) -> Any:
    """``torch.ops.petops.<op>`` when the library has a kernel for ``device``, else the
    reference."""
    if device.type in compiled_devices(op):
        return getattr(torch.ops.petops, op).default(*args)
    return getattr(ref, op)(*args)


def _register_fake(op: str) -> Callable[[_F], _F]:
    """``torch.library.register_fake`` for ``petops::<op>``, skipped when the library is
    absent (the fake kernel is what lets torch.compile trace the op without running it)."""

    def deco(fn: _F) -> _F:
        if compiled_available() and hasattr(torch.ops.petops, op):
            torch.library.register_fake(f"petops::{op}")(fn)
        return fn

    return deco


def bias_act(
    y: torch.Tensor,
    bias: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_bias: torch.Tensor,
    scale: torch.Tensor | None,
    seg_scale: torch.Tensor | None,
    act: int,
) -> torch.Tensor:
    """Segmented bias + activation (+ per-task IA3 column scale).

    Semantics::

        seg = reference.token_segment(seg_indptr, T)                    # [T]
        out = act(y + bias[seg_bias[seg]])                               # [T, N]
        out = out * scale[seg_scale[seg]] if scale is not None else out

    Args: see :func:`petops.reference.bias_act` (y ``[T, N]``, bias ``[P, N]``, scale
    ``[Q, N]``, seg_* int32 ``[S]``, seg_indptr int32 ``[S + 1]``). Returns ``[T, N]``.
    """
    return _call("bias_act", y.device, y, bias, seg_indptr, seg_bias, scale, seg_scale, act)


@_register_fake("bias_act")
def _(y, bias, seg_indptr, seg_bias, scale, seg_scale, act):
    torch._check(y.dim() == 2 and bias.dim() == 2 and bias.shape[1] == y.shape[1])
    return y.new_empty(y.shape)


def bias_residual_layernorm(
    y: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_bias: torch.Tensor | None,
    seg_ln: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Segmented (bias + residual) LayerNorm with per-task gamma/beta.

    Semantics::

        seg = reference.token_segment(seg_indptr, T)                    # [T]
        h = y + bias[seg_bias[seg]] + residual                           # optional terms
        out = F.layer_norm(h, (N,), eps=eps) * gamma[seg_ln[seg]] + beta[seg_ln[seg]]

    Args: see :func:`petops.reference.bias_residual_layernorm` (y, residual ``[T, N]``;
    bias ``[P, N]``; gamma, beta ``[G, N]``). Returns ``[T, N]``.
    """
    return _call(
        "bias_residual_layernorm",
        y.device,
        y,
        residual,
        bias,
        gamma,
        beta,
        seg_indptr,
        seg_bias,
        seg_ln,
        eps,
    )


@_register_fake("bias_residual_layernorm")
def _(y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln, eps):
    torch._check(y.dim() == 2 and gamma.shape[-1] == y.shape[1])
    return y.new_empty(y.shape)


def sgmv_shrink(
    x: torch.Tensor,
    w: torch.Tensor,
    seg_indptr: torch.Tensor,
    item_seg: torch.Tensor,
    item_w_off: torch.Tensor,
    item_rank: torch.Tensor,
    bias: torch.Tensor | None,
    item_b_off: torch.Tensor | None,
    act: int,
    max_rank: int,
) -> torch.Tensor:
    """Grouped low-rank down-projection with mixed ranks (LoRA A, adapter down + act).

    Semantics (per item ``i``, rows of segment ``item_seg[i]``, ``r = item_rank[i]``)::

        A = w[item_w_off[i] : item_w_off[i] + r * K].view(r, K)
        out[rows, :r] = act(x[rows] @ A.T + bias[item_b_off[i] : item_b_off[i] + r])
        # out: [T, max_rank], zero elsewhere

    Args: see :func:`petops.reference.sgmv_shrink` (x ``[T, K]``; w, bias flat pools;
    item_* ``[I]``). Returns ``[T, max_rank]`` in the dtype of ``x``.
    """
    return _call(
        "sgmv_shrink",
        x.device,
        x,
        w,
        seg_indptr,
        item_seg,
        item_w_off,
        item_rank,
        bias,
        item_b_off,
        act,
        max_rank,
    )


@_register_fake("sgmv_shrink")
def _(x, w, seg_indptr, item_seg, item_w_off, item_rank, bias, item_b_off, act, max_rank):
    torch._check(x.dim() == 2 and w.dim() == 1)
    return x.new_empty((x.shape[0], max_rank))


def sgmv_expand(
    y: torch.Tensor,
    tmp: torch.Tensor,
    w: torch.Tensor,
    seg_indptr: torch.Tensor,
    item_seg: torch.Tensor,
    item_w_off: torch.Tensor,
    item_rank: torch.Tensor,
    item_in_off: torch.Tensor,
    item_out_off: torch.Tensor,
    item_out_dim: torch.Tensor,
    item_scale: torch.Tensor,
    bias: torch.Tensor | None,
    item_b_off: torch.Tensor | None,
) -> None:
    """Grouped low-rank up-projection accumulated into ``y`` in place (LoRA B, adapter up).

    Semantics (per item ``i``, rows of segment ``item_seg[i]``)::

        r, n, c0, j0 = item_rank[i], item_out_dim[i], item_out_off[i], item_in_off[i]
        B = w[item_w_off[i] : item_w_off[i] + n * r].view(n, r)
        y[rows, c0 : c0 + n] += item_scale[i] * (tmp[rows, j0 : j0 + r] @ B.T) \\
                                + bias[item_b_off[i] : item_b_off[i] + n]

    Args: see :func:`petops.reference.sgmv_expand` (y ``[T, N]``, tmp ``[T, R]``, item_*
    ``[I]``). Compiled: items of one segment must write disjoint column ranges.
    """
    _call(
        "sgmv_expand",
        y.device,
        y,
        tmp,
        w,
        seg_indptr,
        item_seg,
        item_w_off,
        item_rank,
        item_in_off,
        item_out_off,
        item_out_dim,
        item_scale,
        bias,
        item_b_off,
    )


@_register_fake("sgmv_expand")
def _(y, tmp, *_rest):  # in place on y: only the operands' ranks are checked
    torch._check(y.dim() == 2 and tmp.dim() == 2)


def adapter_residual_layernorm(
    y: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor,
    seg_bias: torch.Tensor,
    w: torch.Tensor,
    seg_w_off: torch.Tensor,
    seg_rank: torch.Tensor,
    seg_act: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_ln: torch.Tensor,
    max_rank: int,
    eps: float,
) -> torch.Tensor:
    """A bottleneck-adapter output site in one op: bias, adapter, residual, LayerNorm.

    Semantics (``seg`` = each token's segment, ``r = seg_rank[s]``, ``o = seg_w_off[s]``)::

        h = y + bias[seg_bias[seg]]                                          # [T, N]
        Wd, bd = w[o[0]:][:r * N].view(r, N), w[o[1]:][:r]                   # down [r, N]
        Wu, bu = w[o[2]:][:N * r].view(N, r), w[o[3]:][:N]                   # up   [N, r]
        h[rows of s] += seg_act[s](h[rows] @ Wd.T + bd) @ Wu.T + bu          # where r > 0
        out = layer_norm(h + residual) * gamma[seg_ln[seg]] + beta[seg_ln[seg]]

    Equal to ``bias_act`` -> ``sgmv_shrink`` -> ``sgmv_expand`` -> ``bias_residual_layernorm``
    with the same intermediate roundings. Args: see
    :func:`petops.reference.adapter_residual_layernorm` (seg_* ``[S]``, seg_w_off int64
    ``[S, 4]``). Returns ``[T, N]``.
    """
    return _call(
        "adapter_residual_layernorm",
        y.device,
        y,
        residual,
        bias,
        seg_bias,
        w,
        seg_w_off,
        seg_rank,
        seg_act,
        gamma,
        beta,
        seg_indptr,
        seg_ln,
        max_rank,
        eps,
    )


@_register_fake("adapter_residual_layernorm")
def _(y, residual, bias, seg_bias, w, seg_w_off, seg_rank, seg_act, gamma, beta, *_rest):
    torch._check(y.dim() == 2 and w.dim() == 1 and seg_w_off.dim() == 2)
    torch._check(gamma.shape[-1] == y.shape[1] and bias.shape[-1] == y.shape[1])
    return y.new_empty(y.shape)


def seg_spmm(
    y: torch.Tensor,
    x: torch.Tensor,
    seg_indptr: torch.Tensor,
    item_seg: torch.Tensor,
    item_slice_off: torch.Tensor,
    slice_ptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Segmented sliced-ELL sparse x dense accumulated into ``y`` in place (Diff-Pruning,
    MaskBERT's index-set form).

    Semantics (per item ``i``, rows of segment ``item_seg[i]``; ``S_i`` the item's ``[N, K]``
    matrix in sliced ELL, ``spmm_slices(N) + 1`` slice pointers at
    ``slice_ptr[item_slice_off[i]:]``, entries ``values[p]``)::

        y[rows] += x[rows] @ S_i.to_dense().T

    Args: see :func:`petops.reference.seg_spmm` (y ``[T, N]``, x ``[T, K]``, slice_ptr int64,
    indices int16 and values flat pools; :func:`petops.reference.pack_sliced_ell` builds the
    layout).
    Compiled: at most one item per segment.
    """
    _call(
        "seg_spmm",
        y.device,
        y,
        x,
        seg_indptr,
        item_seg,
        item_slice_off,
        slice_ptr,
        indices,
        values,
    )


@_register_fake("seg_spmm")
def _(y, x, seg_indptr, item_seg, item_slice_off, slice_ptr, indices, values):
    torch._check(y.dim() == 2 and x.dim() == 2 and x.shape[0] == y.shape[0])


def seg_masked_mm(
    y: torch.Tensor,
    x: torch.Tensor,
    seg_indptr: torch.Tensor,
    item_seg: torch.Tensor,
    item_mask_off: torch.Tensor,
    mask: torch.Tensor,
    dense_w: torch.Tensor,
    alpha: float,
) -> None:
    """Segmented dense x bit-masked shared weight accumulated into ``y`` in place (MaskBERT).

    Semantics (per item ``i`` with ``item_mask_off[i] >= 0``, rows of segment
    ``item_seg[i]``; ``M_i`` the item's ``[N, K]`` bit mask, see
    :func:`petops.reference.pack_mask_words`)::

        y[rows] += alpha * x[rows] @ (dense_w * M_i).T

    Args: see :func:`petops.reference.seg_masked_mm` (y ``[T, N]``, x ``[T, K]``, dense_w
    ``[N, K]``, mask an int32 word pool). Compiled: at most one item per segment; float16 and
    bfloat16 run on tensor cores on CUDA sm_80+.
    """
    _call(
        "seg_masked_mm", y.device, y, x, seg_indptr, item_seg, item_mask_off, mask, dense_w, alpha
    )


@_register_fake("seg_masked_mm")
def _(y, x, seg_indptr, item_seg, item_mask_off, mask, dense_w, alpha):
    torch._check(y.dim() == 2 and x.dim() == 2 and x.shape[0] == y.shape[0])
