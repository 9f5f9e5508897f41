"""Dumb per-segment / per-item Python loops written straight from the reference docstrings.

They validate the vectorised references (the spec) themselves; nothing here is fast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from petops.reference import apply_act


def _rows(seg_indptr: torch.Tensor, s: int) -> slice:
    return slice(int(seg_indptr[s]), int(seg_indptr[s + 1]))


def bias_act(y, bias, seg_indptr, seg_bias, scale, seg_scale, act):
    out = torch.empty_like(y, dtype=torch.float32)
    for s in range(seg_indptr.numel() - 1):
        rows = _rows(seg_indptr, s)
        h = apply_act(y[rows].float() + bias[int(seg_bias[s])].float(), act)
        if scale is not None:
            h = h * scale[int(seg_scale[s])].float()
        out[rows] = h
    return out.to(y.dtype)


def bias_residual_layernorm(y, residual, bias, gamma, beta, seg_indptr, seg_bias, seg_ln, eps):
    out = torch.empty_like(y, dtype=torch.float32)
    for s in range(seg_indptr.numel() - 1):
        rows = _rows(seg_indptr, s)
        h = y[rows].float()
        if bias is not None:
            h = h + bias[int(seg_bias[s])].float()
        if residual is not None:
            h = h + residual[rows].float()
        g, b = gamma[int(seg_ln[s])].float(), beta[int(seg_ln[s])].float()
        out[rows] = F.layer_norm(h, (h.shape[-1],), eps=eps) * g + b
    return out.to(y.dtype)


def sgmv_shrink(x, w, seg_indptr, item_seg, item_w_off, item_rank, bias, item_b_off, act, max_rank):
    k = x.shape[1]
    tmp = torch.zeros(x.shape[0], max_rank)
    for i in range(item_seg.numel()):
        rows = _rows(seg_indptr, int(item_seg[i]))
        r, off = int(item_rank[i]), int(item_w_off[i])
        a = w[off : off + r * k].view(r, k).float()
        h = x[rows].float() @ a.T
        if bias is not None:
            h = h + bias[int(item_b_off[i]) : int(item_b_off[i]) + r].float()
        tmp[rows, :r] = apply_act(h, act)
    return tmp.to(x.dtype)


def sgmv_expand(
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
):
    acc = y.float().clone()
    for i in range(item_seg.numel()):
        rows = _rows(seg_indptr, int(item_seg[i]))
        r, n = int(item_rank[i]), int(item_out_dim[i])
        c0, j0, off = int(item_out_off[i]), int(item_in_off[i]), int(item_w_off[i])
        b_mat = w[off : off + n * r].view(n, r).float()
        d = float(item_scale[i]) * (tmp[rows, j0 : j0 + r].float() @ b_mat.T)
        if bias is not None:
            d = d + bias[int(item_b_off[i]) : int(item_b_off[i]) + n].float()
        acc[rows, c0 : c0 + n] += d
    y.copy_(acc.to(y.dtype))


def adapter_residual_layernorm(
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
):
    n = y.shape[1]
    out = torch.empty_like(y, dtype=torch.float32)
    for s in range(seg_indptr.numel() - 1):
        rows = _rows(seg_indptr, s)
        h = (y[rows].float() + bias[int(seg_bias[s])].float()).to(y.dtype).float()
        r = int(seg_rank[s])
        assert 0 <= r <= max_rank
        if r > 0:
            o = [int(v) for v in seg_w_off[s]]
            wd = w[o[0] : o[0] + r * n].view(r, n).float()
            bd = w[o[1] : o[1] + r].float()
            wu = w[o[2] : o[2] + n * r].view(n, r).float()
            bu = w[o[3] : o[3] + n].float()
            d = apply_act(h @ wd.T + bd, int(seg_act[s])).to(y.dtype).float()
            h = (h + d @ wu.T + bu).to(y.dtype).float()
        if residual is not None:
            h = h + residual[rows].float()
        g, b = gamma[int(seg_ln[s])].float(), beta[int(seg_ln[s])].float()
        out[rows] = F.layer_norm(h, (n,), eps=eps) * g + b
    return out.to(y.dtype)


def seg_spmm(y, x, seg_indptr, item_seg, item_off, slice_ptr, indices, values):
    n, k = y.shape[1], x.shape[1]
    acc = y.float().clone()
    sp, ix = slice_ptr.tolist(), indices.tolist()
    vals = values.float().tolist()
    for i in range(item_seg.numel()):
        rows = _rows(seg_indptr, int(item_seg[i]))
        delta = torch.zeros(n, k)
        base = int(item_off[i])
        for o in range(n):
            s, lane = divmod(o, 32)  # entry j of row o sits at sp[s] + 32 * j + lane
            for p in range(sp[base + s] + lane, sp[base + s + 1], 32):
                kk = ix[p]
                if kk == k:  # padding
                    continue
                delta[o, kk] += vals[p]
        acc[rows] += x[rows].float() @ delta.T
    y.copy_(acc.to(y.dtype))


def seg_masked_mm(y, x, seg_indptr, item_seg, item_mask_off, mask, dense_w, alpha):
    n, k = dense_w.shape
    kw = (k + 31) // 32
    acc = y.float().clone()
    words = mask.numpy().astype("<i4")
    for i in range(item_seg.numel()):
        base = int(item_mask_off[i])
        if base < 0:
            continue
        rows = _rows(seg_indptr, int(item_seg[i]))
        raw = words[base : base + n * kw].view(np.uint8)  # little-endian bytes, bit 0 first
        keep = np.unpackbits(raw, bitorder="little").reshape(n, kw * 32)[:, :k]
        acc[rows] += alpha * (x[rows].float() @ (dense_w.float() * torch.from_numpy(keep)).T)
    y.copy_(acc.to(y.dtype))
