"""Pure-PyTorch reference implementations of the shadow ops.

These functions are the specification of the ``petops`` library: the compiled CPU and CUDA
kernels must match them (within the per-dtype tolerances in ``tests/ops``), and the engine
falls back to them when the compiled library is not built.

Conventions shared by every op:

* Activations are *packed*: ``[T, D]`` rows, one per token, no padding.
* A batch is cut into ``S`` contiguous **segments** by ``seg_indptr`` (int32 ``[S + 1]``,
  ``seg_indptr[0] == 0``, ``seg_indptr[-1] == T``, non-decreasing; empty segments allowed).
  All tokens of a segment belong to one task.
* Per-segment parameters are selected by *slot* indices into pooled tables
  (``seg_bias[s]`` picks row ``bias[seg_bias[s]]``).
* Grouped ops take an **item** list instead: item ``i`` applies one task's weights to the
  tokens of segment ``item_seg[i]``. Weights live in flat 1-D pools and an item names its
  weights by element offset (``item_w_off``), so tasks of different ranks, bottlenecks and
  densities share one pool and one launch.
* Arithmetic is done in float32 and rounded to the activation dtype once, at the end
  (``sgmv_shrink`` rounds its output, as a kernel writing a 16-bit buffer does).

Nothing here loops over tasks or segments in Python: the references are vectorised so that
the fallback path keeps the "no per-task Python loop" rule too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACT_NONE = 0
ACT_GELU = 1  # exact (erf) GELU, BERT's "gelu"
ACT_RELU = 2
ACT_SILU = 3
ACT_GELU_TANH = 4  # tanh approximation, HF "gelu_new"/"gelu_pytorch_tanh"

ACTIVATIONS = {
    "none": ACT_NONE,
    "gelu": ACT_GELU,
    "relu": ACT_RELU,
    "silu": ACT_SILU,
    "swish": ACT_SILU,
    "gelu_new": ACT_GELU_TANH,
    "gelu_pytorch_tanh": ACT_GELU_TANH,
}

# Upper bound on elements materialised at once by seg_spmm's dense-delta reference.
_SPMM_CHUNK_ELEMS = 1 << 25
# Output rows per slice of seg_spmm's sliced-ELL matrices (one GPU warp); kSliceRows in C++.
SPMM_SLICE = 32
# seg_spmm's column indices are int16, the padding index is K: inputs up to this width.
SPMM_MAX_K = 2**15 - 1


def apply_act(x: torch.Tensor, act: int) -> torch.Tensor:
    """Apply activation code ``act`` (one of the ``ACT_*`` constants) elementwise."""
    if act == ACT_NONE:
        return x
    if act == ACT_GELU:
        return F.gelu(x)
    if act == ACT_RELU:
        return F.relu(x)
    if act == ACT_SILU:
        return F.silu(x)
    if act == ACT_GELU_TANH:
        return F.gelu(x, approximate="tanh")
    raise ValueError(
        f"unknown activation code {act}; expected one of {sorted(ACTIVATIONS.values())}"
    )


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function of an HF activation name (a key of :data:`ACTIVATIONS`)."""
    code = ACTIVATIONS[name]
    return lambda x: apply_act(x, code)


def token_segment(seg_indptr: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Segment index of every token.

    Args:
        seg_indptr: int32/int64 ``[S + 1]`` token offsets of the segments.
        num_tokens: ``T``; must equal ``seg_indptr[-1]``.
    Returns:
        int64 ``[T]``: ``out[t] = s`` such that ``seg_indptr[s] <= t < seg_indptr[s + 1]``.
    """
    lengths = (seg_indptr[1:] - seg_indptr[:-1]).long()
    segs = torch.arange(lengths.numel(), device=seg_indptr.device)
    return torch.repeat_interleave(segs, lengths, output_size=num_tokens)


def bias_act(
    y: torch.Tensor,
    bias: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_bias: torch.Tensor,
    scale: torch.Tensor | None,
    seg_scale: torch.Tensor | None,
    act: int,
) -> torch.Tensor:
    """Segmented bias + activation (+ per-task column scaling, IA3).

    Semantics::

        seg = token_segment(seg_indptr, T)
        out = act(y + bias[seg_bias[seg]])
        if scale is not None:
            out = out * scale[seg_scale[seg]]

    Args:
        y: ``[T, N]`` shared GEMM output (fp32/fp16/bf16).
        bias: ``[P, N]`` bias pool, same dtype as ``y``.
        seg_indptr: int32 ``[S + 1]``.
        seg_bias: int32 ``[S]`` rows of ``bias``.
        scale: optional ``[Q, N]`` scaling-vector pool, same dtype as ``y``.
        seg_scale: int32 ``[S]`` rows of ``scale`` (required iff ``scale`` is given).
        act: an ``ACT_*`` code.
    Returns:
        ``[T, N]`` new tensor, dtype of ``y``.
    """
    seg = token_segment(seg_indptr, y.shape[0])
    out = apply_act(y.float() + bias.float()[seg_bias.long()[seg]], act)
    if scale is not None:
        assert seg_scale is not None, "seg_scale is required when scale is given"
        out = out * scale.float()[seg_scale.long()[seg]]
    return out.to(y.dtype)


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

        seg = token_segment(seg_indptr, T)
        h = y + (bias[seg_bias[seg]] if bias is not None else 0) + (residual or 0)
        out = layer_norm(h, eps) * gamma[seg_ln[seg]] + beta[seg_ln[seg]]

    Args:
        y: ``[T, N]``.
        residual: optional ``[T, N]``.
        bias: optional ``[P, N]`` bias pool.
        gamma, beta: ``[G, N]`` LayerNorm pools.
        seg_indptr: int32 ``[S + 1]``.
        seg_bias: int32 ``[S]`` (required iff ``bias`` is given).
        seg_ln: int32 ``[S]`` rows of ``gamma``/``beta``.
        eps: LayerNorm epsilon.
    Returns:
        ``[T, N]`` new tensor, dtype of ``y``.
    """
    seg = token_segment(seg_indptr, y.shape[0])
    h = y.float()
    if bias is not None:
        assert seg_bias is not None, "seg_bias is required when bias is given"
        h = h + bias.float()[seg_bias.long()[seg]]
    if residual is not None:
        h = h + residual.float()
    ln = seg_ln.long()[seg]
    out = F.layer_norm(h, (h.shape[-1],), eps=eps) * gamma.float()[ln] + beta.float()[ln]
    return out.to(y.dtype)


def _item_tokens(
    seg_indptr: torch.Tensor, item_seg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of every item, padded to the longest item.

    Returns:
        ``tok [I, Lmax]`` int64 token index (0 where padded) and ``valid [I, Lmax]`` bool.
    """
    starts = seg_indptr.long()[item_seg.long()]
    lens = seg_indptr.long()[item_seg.long() + 1] - starts
    lmax = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(lmax, device=seg_indptr.device)
    valid = pos[None, :] < lens[:, None]
    tok = torch.where(valid, starts[:, None] + pos[None, :], torch.zeros_like(pos)[None, :])
    return tok, valid


def _gather_matrices(
    w: torch.Tensor,
    off: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    max_rows: int,
    max_cols: int,
) -> torch.Tensor:
    """Gather row-major ``[rows_i, cols_i]`` matrices at element offsets ``off`` from flat ``w``.

    Returns float32 ``[I, max_rows, max_cols]``, zero outside each item's own shape.
    """
    r = torch.arange(max_rows, device=w.device)
    c = torch.arange(max_cols, device=w.device)
    inside = (r[None, :, None] < rows[:, None, None]) & (c[None, None, :] < cols[:, None, None])
    idx = off[:, None, None] + r[None, :, None] * cols[:, None, None] + c[None, None, :]
    idx = torch.where(inside, idx, torch.zeros_like(idx))
    return torch.where(inside, w.float()[idx], torch.zeros((), device=w.device))


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
    """Grouped low-rank down-projection (LoRA A, adapter down), mixed ranks in one call.

    Semantics::

        tmp = zeros(T, max_rank)
        for i in range(I):                       # one task's weights per item
            rows = range(seg_indptr[item_seg[i]], seg_indptr[item_seg[i] + 1])
            r = item_rank[i]
            A = w[item_w_off[i] : item_w_off[i] + r * K].view(r, K)   # PEFT lora_A layout
            h = x[rows] @ A.T
            if bias is not None:
                h = h + bias[item_b_off[i] : item_b_off[i] + r]
            tmp[rows, :r] = act(h)

    Each segment has at most one shrink item; rows of segments without one stay zero.

    Args:
        x: ``[T, K]`` activations.
        w: flat 1-D weight pool, dtype of ``x``.
        seg_indptr: int32 ``[S + 1]``.
        item_seg: int32 ``[I]`` segment of each item.
        item_w_off: int64 ``[I]`` element offset of each item's ``[r, K]`` matrix in ``w``.
        item_rank: int32 ``[I]``, each in ``[1, max_rank]``.
        bias: optional flat 1-D bias pool; ``item_b_off`` int64 ``[I]`` offsets into it.
        act: an ``ACT_*`` code applied after the bias.
        max_rank: width of the output.
    Returns:
        ``[T, max_rank]`` in the dtype of ``x``.
    """
    num_tokens, k_dim = x.shape
    out = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if item_seg.numel() == 0 or max_rank == 0:
        return out.to(x.dtype)
    tok, valid = _item_tokens(seg_indptr, item_seg)  # [I, L]
    rank = item_rank.long()
    a = _gather_matrices(w, item_w_off.long(), rank, torch.full_like(rank, k_dim), max_rank, k_dim)
    h = torch.bmm(x.float()[tok], a.transpose(1, 2))  # [I, L, R]
    if bias is not None:
        assert item_b_off is not None, "item_b_off is required when bias is given"
        r = torch.arange(max_rank, device=x.device)
        bidx = item_b_off.long()[:, None] + r[None, :]
        inside = r[None, :] < rank[:, None]
        b = torch.where(inside, bias.float()[torch.where(inside, bidx, 0)], 0.0)
        h = h + b[:, None, :]
    h = apply_act(h, act)
    r = torch.arange(max_rank, device=x.device)
    h = torch.where(r[None, None, :] < rank[:, None, None], h, 0.0)
    out[tok[valid]] = h[valid]
    return out.to(x.dtype)


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
    """Grouped low-rank up-projection accumulated into ``y`` (LoRA B, adapter up).

    Semantics (in place on ``y``)::

        for i in range(I):
            rows = range(seg_indptr[item_seg[i]], seg_indptr[item_seg[i] + 1])
            r, n, c0, j0 = item_rank[i], item_out_dim[i], item_out_off[i], item_in_off[i]
            B = w[item_w_off[i] : item_w_off[i] + n * r].view(n, r)   # PEFT lora_B layout
            d = item_scale[i] * (tmp[rows, j0 : j0 + r] @ B.T)
            if bias is not None:
                d = d + bias[item_b_off[i] : item_b_off[i] + n]
            y[rows, c0 : c0 + n] += d

    Several items may target one segment (LoRA on q, k and v writes three column blocks of
    the fused QKV output), each reading its own ``tmp`` columns.

    Args:
        y: ``[T, N]`` accumulated in place.
        tmp: ``[T, R]`` from :func:`sgmv_shrink`.
        w: flat 1-D weight pool, dtype of ``y``.
        item_seg: int32 ``[I]``; item_w_off: int64 ``[I]``; item_rank: int32 ``[I]``;
        item_in_off: int32 ``[I]`` first ``tmp`` column; item_out_off: int32 ``[I]`` first
        ``y`` column; item_out_dim: int32 ``[I]``; item_scale: float32 ``[I]``.
        bias: optional flat 1-D pool, offsets ``item_b_off`` int64 ``[I]`` (not scaled).
    """
    if item_seg.numel() == 0:
        return
    tok, valid = _item_tokens(seg_indptr, item_seg)  # [I, L]
    rank = item_rank.long()
    out_dim = item_out_dim.long()
    max_rank = int(rank.max())
    max_out = int(out_dim.max())
    b_mat = _gather_matrices(w, item_w_off.long(), out_dim, rank, max_out, max_rank)  # [I, n, r]
    j = torch.arange(max_rank, device=y.device)
    cols = item_in_off.long()[:, None] + j[None, :]
    col_ok = j[None, :] < rank[:, None]
    t_in = tmp.float()[tok[:, :, None], torch.where(col_ok, cols, 0)[:, None, :]]  # [I, L, r]
    t_in = torch.where(col_ok[:, None, :], t_in, 0.0)
    d = torch.bmm(t_in, b_mat.transpose(1, 2)) * item_scale.float()[:, None, None]  # [I, L, n]
    o = torch.arange(max_out, device=y.device)
    out_ok = o[None, :] < out_dim[:, None]
    if bias is not None:
        assert item_b_off is not None, "item_b_off is required when bias is given"
        bidx = torch.where(out_ok, item_b_off.long()[:, None] + o[None, :], 0)
        d = d + torch.where(out_ok, bias.float()[bidx], 0.0)[:, None, :]
    mask = valid[:, :, None] & out_ok[:, None, :]
    rows = tok[:, :, None].expand_as(mask)[mask]
    ycols = (item_out_off.long()[:, None, None] + o[None, None, :]).expand_as(mask)[mask]
    acc = y.float()
    acc.index_put_((rows, ycols), d[mask], accumulate=True)
    y.copy_(acc.to(y.dtype))


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
    """A dense layer's whole output epilogue with a per-task bottleneck adapter, fused.

    Semantics (``round`` is a cast to ``y.dtype``, where the unfused ops write a buffer)::

        seg = token_segment(seg_indptr, T)
        h = round(y + bias[seg_bias[seg]])                                   # [T, N]
        for s with seg_rank[s] = r > 0, rows = the tokens of segment s:
            o = seg_w_off[s]                        # element offsets into the flat pool w
            Wd, bd = w[o[0]:][:r * N].view(r, N), w[o[1]:][:r]          # adapter down
            Wu, bu = w[o[2]:][:N * r].view(N, r), w[o[3]:][:N]          # adapter up
            d = round(act_s(h[rows] @ Wd.T + bd))                        # act_s = seg_act[s]
            h[rows] = round(h[rows] + d @ Wu.T + bu)
        out = layer_norm(h + residual, eps) * gamma[seg_ln[seg]] + beta[seg_ln[seg]]

    That is ``bias_act`` -> ``sgmv_shrink`` -> ``sgmv_expand`` -> ``bias_residual_layernorm``
    in one op, indexed per segment like the epilogues: segments with rank 0 get the plain
    LayerNorm epilogue, and tasks of different bottlenecks and activations share the call.

    Args:
        y: ``[T, N]`` shared GEMM output, no bias (fp32/fp16/bf16).
        residual: optional ``[T, N]``.
        bias: ``[P, N]`` bias pool; seg_bias: int32 ``[S]`` rows of it.
        w: flat 1-D adapter weight pool, dtype of ``y``.
        seg_w_off: int64 ``[S, 4]`` element offsets of down.weight ``[r, N]``, down.bias
            ``[r]``, up.weight ``[N, r]`` and up.bias ``[N]`` (read only where rank > 0).
        seg_rank: int32 ``[S]`` bottleneck, each in ``[0, max_rank]``.
        seg_act: int32 ``[S]`` ``ACT_*`` code of each segment's adapter.
        gamma, beta: ``[G, N]`` LayerNorm pools; seg_ln: int32 ``[S]`` rows of them.
        seg_indptr: int32 ``[S + 1]``.
        max_rank: upper bound on ``seg_rank``.
        eps: LayerNorm epsilon.
    Returns:
        ``[T, N]`` new tensor, dtype of ``y``.
    """
    n_tok, n = y.shape
    dt = y.dtype
    seg = token_segment(seg_indptr, n_tok)
    h = (y.float() + bias.float()[seg_bias.long()[seg]]).to(dt)
    rank = seg_rank.long()
    items = torch.nonzero(rank > 0).flatten()
    if items.numel() and max_rank > 0:
        tok, valid = _item_tokens(seg_indptr, items)  # [I, L]
        r_i, off = rank[items], seg_w_off.long()[items]  # [I], [I, 4]
        full = torch.full_like(r_i, n)
        wd = _gather_matrices(w, off[:, 0], r_i, full, max_rank, n)  # [I, R, N]
        wu = _gather_matrices(w, off[:, 2], full, r_i, n, max_rank)  # [I, N, R]
        bd = _gather_matrices(w, off[:, 1], torch.ones_like(r_i), r_i, 1, max_rank)  # [I, 1, R]
        bu = _gather_matrices(w, off[:, 3], torch.ones_like(r_i), full, 1, n)  # [I, 1, N]
        hs = h.float()[tok]  # [I, L, N]
        pre = torch.bmm(hs, wd.transpose(1, 2)) + bd  # [I, L, R]
        acts = seg_act.long()[items][:, None, None]
        d = torch.zeros_like(pre)
        for code in torch.unique(acts).tolist():  # activation kinds, not tasks
            d = torch.where(acts == code, apply_act(pre, int(code)), d)
        d = d.to(dt).float()
        up = (hs + torch.bmm(d, wu.transpose(1, 2)) + bu).to(dt)  # [I, L, N]
        h[tok[valid]] = up[valid]
    return bias_residual_layernorm(h, residual, None, gamma, beta, seg_indptr, None, seg_ln, eps)


def spmm_slices(n_out: int) -> int:
    """Slices of :data:`SPMM_SLICE` output rows in an ``[n_out, K]`` sliced-ELL matrix."""
    return (n_out + SPMM_SLICE - 1) // SPMM_SLICE


def sliced_entries(row_counts: torch.Tensor) -> torch.Tensor:
    """Entries (padding included) of a sliced-ELL matrix whose rows hold ``row_counts``
    (``[N]`` int64) non-zeros: 32 times the longest row of each 32-row slice, as an int64
    ``[]`` tensor on ``row_counts``' device (no host sync)."""
    n = row_counts.numel()
    padded = F.pad(row_counts, (0, spmm_slices(n) * SPMM_SLICE - n))
    return padded.view(-1, SPMM_SLICE).amax(1).sum() * SPMM_SLICE


def pack_sliced_ell(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor | None,
    n_out: int,
    k_dim: int,
    n_entries: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """COO non-zeros of an ``[n_out, k_dim]`` matrix -> the sliced-ELL layout of
    :func:`seg_spmm`.

    Args:
        rows, cols: ``[nnz]`` int64 output row and input column of each non-zero (any order;
            a (row, col) pair at most once).
        values: ``[nnz]`` their values, or None (the layout of an index set alone).
        n_out, k_dim: the matrix shape ``[N, K]``.
        n_entries: ``E`` below when the caller has it (:func:`sliced_entries` of many
            matrices read at once), which spares a GPU caller one host sync a matrix.

    Returns:
        ``slice_ptr`` int64 ``[spmm_slices(N) + 1]`` (relative: ``slice_ptr[0] == 0``; add the
        pool offset of ``indices`` before use), ``indices`` int16 ``[E]`` (``K`` in padding
        entries) and ``values`` ``[E]`` (0 in padding) or None. ``E`` is
        ``SPMM_SLICE * sum(width_s)``, ``width_s`` the most non-zeros of a row in slice ``s``.
    """
    if k_dim > SPMM_MAX_K:
        raise ValueError(
            f"sliced ELL holds inputs up to {SPMM_MAX_K} columns (int16 indices), got "
            f"K={k_dim}; split the input columns over several matrices"
        )
    dev = rows.device
    n_sl = spmm_slices(n_out)
    counts = torch.bincount(rows, minlength=n_sl * SPMM_SLICE)
    width = counts.view(n_sl, SPMM_SLICE).amax(1)
    slice_ptr = F.pad(torch.cumsum(width * SPMM_SLICE, 0), (1, 0))
    order = torch.argsort(rows, stable=True)
    # entry e of the row-sorted list, of row r, lands at
    # slice_ptr[r // 32] + 32 * (e - first[r]) + r % 32 = row_base[r] + 32 * e
    lanes = torch.arange(counts.numel(), device=dev)
    first = torch.cumsum(counts, 0) - counts
    row_base = (
        slice_ptr[:-1].repeat_interleave(SPMM_SLICE) + lanes % SPMM_SLICE - SPMM_SLICE * first
    )
    pos = row_base[rows[order]] + SPMM_SLICE * torch.arange(rows.numel(), device=dev)
    n_ent = int(slice_ptr[-1]) if n_entries is None else n_entries
    indices = torch.full((n_ent,), k_dim, dtype=torch.int16, device=dev)
    indices[pos] = cols[order].to(torch.int16)
    vals = None
    if values is not None:
        vals = torch.zeros(n_ent, dtype=values.dtype, device=dev)
        vals[pos] = values[order]
    return slice_ptr, indices, vals


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
    """Segmented sparse x dense, accumulated into ``y`` (Diff-Pruning deltas, MaskBERT masks).

    Each item holds one task's sparse ``[N, K]`` matrix in **sliced ELL** (SELL-32): the
    output rows are cut into ``spmm_slices(N)`` slices of :data:`SPMM_SLICE` (32) rows; slice
    ``s`` of item ``i`` owns the flat positions ``[slice_ptr[b + s], slice_ptr[b + s + 1])``
    (``b = item_slice_off[i]``; absolute positions into ``indices``/``values``), a multiple of
    32 long, ``width_s = length / 32`` entries per row, entry ``j`` of row ``o = 32 * s + l``
    at position ``slice_ptr[b + s] + 32 * j + l``. ``indices[p]`` is the input column; ``K``
    marks a padding entry, which contributes nothing (rows past ``N`` in the last slice are
    ignored). A GPU warp then reads 32 rows' entries from one contiguous run (the layout of
    :func:`pack_sliced_ell`).

    Semantics (in place on ``y``)::

        for i in range(I):
            rows = range(seg_indptr[item_seg[i]], seg_indptr[item_seg[i] + 1])
            for o in range(N):
                s, l = divmod(o, 32); lo, hi = slice_ptr[b + s], slice_ptr[b + s + 1]
                for p in range(lo + l, hi, 32):
                    k = indices[p]
                    if k == K: continue
                    y[rows, o] += x[rows, k] * values[p]

    (A MaskBERT index set over the shared ``W`` stores ``-W`` at its masked-out entries as
    values, so the walk reads no weight rows.)

    Args:
        y: ``[T, N]`` accumulated in place.
        x: ``[T, K]`` the same input the shared GEMM saw.
        seg_indptr: int32 ``[S + 1]``; item_seg: int32 ``[I]``.
        item_slice_off: int64 ``[I]`` offset of each item's ``spmm_slices(N) + 1`` slice
            pointers.
        slice_ptr: int64 flat slice-pointer pool; indices: int16 flat column pool
            (``K <= SPMM_MAX_K``).
        values: flat value pool at the positions of ``indices`` (dtype of ``y``).
    """
    if item_seg.numel() == 0:
        return
    n_out, k_dim = y.shape[1], x.shape[1]
    n_sl = spmm_slices(n_out)
    dev = y.device
    tok, valid = _item_tokens(seg_indptr, item_seg)
    acc = y.float()
    per_chunk = max(1, _SPMM_CHUNK_ELEMS // max(1, n_out * k_dim))
    s_range = torch.arange(n_sl + 1, device=dev)
    for lo in range(0, item_seg.numel(), per_chunk):  # bounded chunks, not per task
        sl = slice(lo, lo + per_chunk)
        sp = slice_ptr[item_slice_off[sl].long()[:, None] + s_range[None, :]].long()  # [C, S+1]
        sizes = (sp[:, 1:] - sp[:, :-1]).reshape(-1)  # [C*S]
        flat_slice = torch.repeat_interleave(torch.arange(sizes.numel(), device=dev), sizes)
        q = (
            torch.arange(flat_slice.numel(), device=dev)
            - (torch.cumsum(sizes, 0) - sizes)[flat_slice]
        )  # rank within the slice
        p = sp[:, :-1].reshape(-1)[flat_slice] + q
        item_local = flat_slice // n_sl
        o = (flat_slice % n_sl) * SPMM_SLICE + q % SPMM_SLICE
        k = indices[p].long()
        keep = (k < k_dim) & (o < n_out)
        item_local, o, k, p = item_local[keep], o[keep], k[keep], p[keep]
        v = values.float()[p]
        delta = torch.zeros(sp.shape[0], n_out, k_dim, device=dev)
        delta.index_put_((item_local, o, k), v, accumulate=True)
        xs = x.float()[tok[sl]]  # [C, L, K]
        d = torch.bmm(xs, delta.transpose(1, 2))  # [C, L, N]
        v_ok = valid[sl]
        acc.index_add_(0, tok[sl][v_ok], d[v_ok])
    y.copy_(acc.to(y.dtype))


def pack_mask_words(keep: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` bool mask -> int32 words ``[N * ceil(K / 32)]``, the layout of
    :func:`seg_masked_mm`: row ``o``'s words are ``[o * W, (o + 1) * W)`` with
    ``W = ceil(K / 32)``, and bit ``k % 32`` of word ``k // 32`` is ``keep[o, k]``."""
    n, k = keep.shape
    kw = (k + 31) // 32
    bits = torch.zeros(n, kw * 32, dtype=torch.int64, device=keep.device)
    bits[:, :k] = keep.to(torch.int64)
    words = (bits.view(n, kw, 32) << torch.arange(32, device=keep.device)).sum(-1)  # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(-1)


def unpack_mask_words(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask_words` for ``[..., N * ceil(K / 32)]`` words: bool
    ``[..., N, K]``."""
    kw = (k + 31) // 32
    w = words.view(*words.shape[:-1], -1, kw, 1)
    bits = (w >> torch.arange(32, device=words.device, dtype=torch.int32)) & 1
    return bits.flatten(-2)[..., :k].bool()


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
    """Segmented dense x bit-masked shared weight, accumulated into ``y`` (MaskBERT).

    Item ``i`` holds one task's ``[N, K]`` bit mask ``M_i`` over the shared weight
    ``dense_w``, as ``N * ceil(K / 32)`` int32 words at ``mask[item_mask_off[i]:]`` (layout:
    :func:`pack_mask_words`). ``item_mask_off[i] == -1`` means the task has no mask at this
    site: the item adds nothing.

    Semantics (in place on ``y``)::

        for i in range(I):
            if item_mask_off[i] >= 0:
                rows = range(seg_indptr[item_seg[i]], seg_indptr[item_seg[i] + 1])
                M = unpack_mask_words(mask[item_mask_off[i]:][: N * ceil(K / 32)], K)
                y[rows] += alpha * x[rows] @ (dense_w * M).T

    A MaskBERT task's product over its kept weights (``alpha = 1``, ``M_i`` the keep-mask):
    one bit per weight whatever the density, against 4 bytes per masked-out weight (fp16
    column and value, padded) in :func:`seg_spmm`'s index form (smaller above about 2%
    density), and a dense tensor-core product whose cost does not grow with the density.

    Args:
        y: ``[T, N]`` accumulated in place.
        x: ``[T, K]`` the same input the shared GEMM saw.
        seg_indptr: int32 ``[S + 1]``; item_seg: int32 ``[I]``.
        item_mask_off: int64 ``[I]`` word offset of each item's mask, or -1.
        mask: int32 flat word pool.
        dense_w: ``[N, K]`` the shared weight (dtype of ``y``).
        alpha: scale of the masked product.
    """
    n_out, k_dim = dense_w.shape
    keep = item_mask_off >= 0
    if not bool(keep.any()):
        return
    segs, offs = item_seg[keep], item_mask_off[keep].long()
    tok, valid = _item_tokens(seg_indptr, segs)
    acc = y.float()
    n_words = n_out * ((k_dim + 31) // 32)
    w = dense_w.float()
    per_chunk = max(1, _SPMM_CHUNK_ELEMS // max(1, n_out * k_dim))
    for lo in range(0, segs.numel(), per_chunk):  # bounded chunks, not per task
        sl = slice(lo, lo + per_chunk)
        words = mask[offs[sl, None] + torch.arange(n_words, device=mask.device)]  # [C, words]
        delta = alpha * w * unpack_mask_words(words, k_dim)  # [C, N, K]
        d = torch.bmm(x.float()[tok[sl]], delta.transpose(1, 2))  # [C, L, N]
        acc.index_add_(0, tok[sl][valid[sl]], d[valid[sl]])
    y.copy_(acc.to(y.dtype))
