"""One mixed-task forward: shared ops over all tokens, shadow ops per segment.

Per layer (DESIGN.md §4)::

    qkv  = x @ Wqkv.T   (+ sparse / LoRA deltas)  -> bias (+IA3 scale)          [T, 3H]
    a    = attention(qkv)      (packed efficient / flash on CUDA, else padded SDPA)
    h    = LN(a @ Wo.T (+ deltas) + b [+ adapter] + x)                           [T, H]
    i    = act(h @ W1.T (+ deltas) + b) (* IA3 scale)                            [T, F]
    x    = LN(i @ W2.T (+ deltas) + b [+ adapter] + h)                           [T, H]

An output site with adapters (and no other output transform) is one fused op: bias,
adapter, residual and LayerNorm together (``adapter_residual_layernorm``).

Every per-task piece is one grouped ``petops`` launch per op family; nothing here loops over
tasks or requests. The one exception is the opt-in ``SHADOW_STREAMS=N`` mode, PetS's
alternative kept for comparison (:class:`ShadowStreams`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from petops.reference import ACT_GELU, ACT_GELU_TANH, ACTIVATIONS

from .batch import Batch, build_batch
from .heads import HeadPlan
from .pet import PetMethod
from .pet.base import OutputEpilogue
from .registry import TaskRegistry

try:  # padding-free FlashAttention-2 (torch >= 2.9, CUDA, half precision)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn = None  # type: ignore[assignment]

EFFICIENT_MAX_SEQLEN = 64
"""Packed batches whose longest sequence is at most this long attend through the
memory-efficient kernel, longer ones through FlashAttention-2 (docs/decisions.md: on an H100
the former is 1.8x faster at 64 tokens, the latter 1.2x at 128)."""


def _efficient_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Padding-free attention over packed sequences (CUDA). q, k, v ``[T, nh, hd]`` (any
    strides with the last one 1: views of the QKV GEMM's output), ``cu_seqlens`` int32
    ``[B + 1]``. Returns ``[T, nh, hd]``.

    PyTorch's memory-efficient (CUTLASS) kernel in its variable-length form: its 64 x 64
    tiles fit short sequences, where FlashAttention-2's 128-row tiles run half empty."""
    out = torch.ops.aten._efficient_attention_forward(
        q[None], k[None], v[None], None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, 0
    )[0]
    return out[0]


@dataclass
class SegmentParams:
    """Per-segment epilogue rows for one batch (device int32 ``[S]`` each)."""

    bias: torch.Tensor
    ln: torch.Tensor
    scale: torch.Tensor | None  # None when no segment uses IA3 scales
    # every token takes the shared GEMM and the backbone's biases (slot 0), and no segment
    # IA3 scales: the qkv bias rides in the GEMM's epilogue, no separate bias pass
    shared_bias: bool = False
    # shared_bias, and no plan changes the ffn_in GEMM's output: its bias and GELU ride in
    # the GEMM's cuBLASLt epilogue (CUDA only, see SharedEncoder.gelu_epilogue)
    gelu_in_gemm: bool = False


@dataclass
class Prepared:
    """A batch after the host half of its forward (:meth:`SharedEncoder.prepare`)."""

    batch: Batch
    active: list[tuple[PetMethod, Any]]  # (PET type, its plan for the batch's segments)
    sp: SegmentParams
    head: HeadPlan
    graph_key: Any = None  # set by the engine once computed (a reused batch keeps it)


class ShadowStreams:
    """PetS's multi-stream mode (``SHADOW_STREAMS=N``), kept for the paper's Fig. 11: each
    task's shadow ops are planned and launched separately, round-robin over N CUDA streams
    forked from and joined to the main stream at every site. The grouped ops are the default
    and faster; this is the one place the mode lives."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.streams = [torch.cuda.Stream(device) for _ in range(n)]
        self.device = device

    @staticmethod
    def plans(method: PetMethod, batch: Batch, segs: torch.Tensor) -> list[tuple[PetMethod, Any]]:
        """One plan per task segment (instead of one for all of the type's segments)."""
        return [(method, method.prepare(batch, s[None])) for s in segs]

    def run(self, active: list[tuple[PetMethod, Any]], fn: Any) -> None:
        """``fn(method, plan)`` for every plan, forked over the streams (plans touch disjoint
        rows: no races), joined before the main stream goes on."""
        main = torch.cuda.current_stream(self.device)
        for i, (method, plan) in enumerate(active):
            stream = self.streams[i % len(self.streams)]
            if i < len(self.streams):
                stream.wait_stream(main)
            with torch.cuda.stream(stream):
                fn(method, plan)
        for stream in self.streams[: len(active)]:
            main.wait_stream(stream)


def _check_row_order(batch: Batch, own: np.ndarray) -> None:
    """Refuse a batch whose tasks that compute their linear layers in full (``own``, per
    segment) are not its last segments, from ``batch.shared_rows`` on."""
    first = int(np.argmax(own)) if own.any() else len(own)
    start = int(batch.seg_indptr_cpu[first])
    if own[first:].all() and batch.shared_rows == start:
        return
    raise ValueError(
        f"the batch's shared GEMM rows ({batch.shared_rows} of {batch.num_tokens} tokens) do "
        f"not stop where its tasks that compute their linear layers in full begin "
        f"({int(own.sum())} of {len(own)} segments, from token {start}); build it with "
        "SharedEncoder.batch, or build_batch(..., owns_linear=registry.slots.owns_linear)"
    )


class SharedEncoder:
    def __init__(self, registry: TaskRegistry, shadow_streams: int = 0) -> None:
        """The forward over ``registry``'s backbone (``ctx.backbone``), tasks and heads.

        ``shadow_streams`` > 0 (CUDA): PetS's multi-stream mode (:class:`ShadowStreams`).
        """
        self.registry, self.ctx, self.heads = registry, registry.ctx, registry.heads
        self.w = self.ctx.backbone
        # An output site whose only transform is one type's fused op (adapters) runs as that
        # op. Tests turn it off to compare with the unfused ops, which also run whenever the
        # batch holds several output transforms.
        self.fuse_outputs = True
        self.spec = self.w.spec
        self.act = ACTIVATIONS.get(self.spec.act)
        if self.act is None:
            raise ValueError(
                f"backbone hidden_act {self.spec.act!r} is not supported; "
                f"supported: {sorted(ACTIVATIONS)}"
            )
        ctx = self.ctx
        # cuBLASLt's GEMM epilogue computes GELU in its tanh form (so does torch's CUDA
        # fallback for this op): exact for gelu_new, within half-precision rounding of the
        # exact (erf) GELU, as TensorRT's and FasterTransformer's BERTs do
        # (docs/decisions.md); float32 keeps the exact form, where the gap would show
        self.gelu_epilogue = (
            ctx.device.type == "cuda"
            and ctx.dtype in (torch.float16, torch.bfloat16)
            and self.act in (ACT_GELU, ACT_GELU_TANH)
        )
        # Both packed kernels want heads of a multiple of 8 values (16-byte rows); other
        # backbones attend through the padded SDPA path, which checks and dispatches itself.
        self.packed_attention = ctx.device.type == "cuda" and self.spec.head_dim % 8 == 0
        self.flash_attention = (
            self.packed_attention
            and _varlen_attn is not None
            and ctx.dtype in (torch.float16, torch.bfloat16)
        )
        self.streams = (
            ShadowStreams(shadow_streams, ctx.device)
            if shadow_streams > 0 and ctx.device.type == "cuda"
            else None
        )

    # ------------------------------------------------------------------------------- forward
    def batch(
        self,
        ids: Sequence[np.ndarray],
        task_slots: Sequence[int] | np.ndarray,
        pad_to: int = 0,
        types: Sequence[np.ndarray | None] | None = None,
        upload: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Batch:
        """:func:`~pets.batch.build_batch` on this encoder's device, in the row order its
        registry's tasks need (tasks that compute their linear layers in full go last)."""
        return build_batch(
            ids,
            task_slots,
            self.ctx.device,
            pad_to=pad_to,
            upload=upload,
            types=types,
            owns_linear=self.registry.slots.owns_linear,
        )

    @torch.inference_mode()
    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``batch`` eagerly. Returns head outputs ``[B, D]`` float32 and widths ``[B]``
        (host). The serving path is :meth:`prepare` + :meth:`compute` (graph-captured)."""
        prepared = self.prepare(batch)
        return self.compute(prepared), prepared.head.width

    def prepare(
        self, batch: Batch, upload: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Prepared:
        """Host half of a forward: every PET type's plan, the segment rows, the head rows.

        Args:
            batch: the packed batch.
            upload: host tensor -> device tensor; the serving path passes
                :meth:`pets.staging.Stager.put`, so the whole batch crosses in one copy.
                None: each array is copied on its own (:meth:`PetContext.to_device`).
        """
        reg = self.registry
        rows = reg.slots.segments(batch.seg_task_cpu)
        pet_codes = rows.pet
        active: list[tuple[PetMethod, Any]] = []
        _check_row_order(batch, reg.slots.owns_linear(batch.seg_task_cpu.numpy()))
        to_device = self.ctx.to_device
        self.ctx.upload = upload  # PetContext.to_device stages through it while planning
        try:
            codes = pet_codes.numpy()
            for code in np.unique(codes).tolist():  # one entry per PET *type* present
                method = reg.by_code.get(code)
                if method is not None:
                    segs = torch.from_numpy(np.flatnonzero(codes == code))  # int64 [S_type]
                    if self.streams is not None:
                        active.extend(self.streams.plans(method, batch, segs))
                    else:
                        active.append((method, method.prepare(batch, segs)))
            transforms = [(m, p) for m, p in active if m.has_output_transform and p is not None]
            if len(transforms) > 1 or self.streams is not None or not self.fuse_outputs:
                for method, plan in transforms:  # the output sites will run unfused
                    method.prepare_unfused(plan)
            scaled = bool((rows.scale > 0).any())
            shared_bias = (
                not scaled and not bool(rows.bias.any()) and batch.shared_rows == batch.num_tokens
            )
            sp = SegmentParams(
                bias=to_device(rows.bias),
                ln=to_device(rows.ln),
                scale=to_device(rows.scale) if scaled else None,
                shared_bias=shared_bias,
                gelu_in_gemm=shared_bias
                and self.gelu_epilogue
                and not any("ffn_in" in m.linear_sites(p) for m, p in active),
            )
            head = self.heads.plan(
                batch.cu_seqlens,
                batch.seq_task_cpu,
                batch.valid_lens,
                to_device,
                batch.cu_seqlens_cpu,
                batch.valid_lens_cpu,
            )
        finally:
            self.ctx.upload = None
        return Prepared(batch, active, sp, head)

    def compute(self, p: Prepared) -> torch.Tensor:
        """Device half of a forward: ``[B, D]`` float32 head outputs. Reads only device
        tensors and host scalars fixed by :meth:`prepare`, so it can be graph-captured."""
        with torch.inference_mode():
            x = self._embed(p.batch, p.sp)
            for layer in range(self.spec.layers):
                x = self._layer(layer, x, p.batch, p.sp, p.active)
            return self.heads.compute(x, p.head)

    def _embed(self, batch: Batch, sp: SegmentParams) -> torch.Tensor:
        w = self.w
        # F.embedding: the same rows as w.word[ids], a third of advanced indexing's CPU cost
        tt = w.token_type
        types = tt[0] if batch.token_types is None else F.embedding(batch.token_types, tt)
        x = F.embedding(batch.input_ids, w.word) + F.embedding(batch.positions, w.position) + types
        ln = self.ctx.ln.tables
        return self.ctx.ops.bias_residual_layernorm(
            x,
            None,
            None,
            ln["emb_ln.gamma"][0],
            ln["emb_ln.beta"][0],
            batch.seg_indptr,
            None,
            sp.ln,
            self.spec.eps,
        )

    def _linear(
        self,
        site: str,
        layer: int,
        x: torch.Tensor,
        batch: Batch,
        active: list[tuple[PetMethod, Any]],
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ W.T`` (``+ bias`` or ``+ residual`` where given) with every type's deltas.
        ``x`` ``[T, K]`` -> ``[T, N]``.

        The shared GEMM covers the first ``batch.shared_rows`` tokens; the rest belong to
        tasks that compute the whole product themselves and start from zeros (from
        ``residual`` where given). ``bias`` (``[N]``, one row for every token) is added in the
        GEMM's epilogue; it is only given when every token takes the shared GEMM.
        ``residual`` (``[T, N]``) is the GEMM's C operand (beta = 1), so the output site's
        LayerNorm pass reads one tensor instead of two."""
        w = self.w.linear[site][layer]
        r, t = batch.shared_rows, x.shape[0]
        if bias is not None:
            assert r == t and residual is None, "a GEMM bias needs every row, no residual"
            y = torch.addmm(bias, x, w.t())  # cuBLASLt bias epilogue on CUDA
        elif r == t:
            y = torch.mm(x, w.t()) if residual is None else torch.addmm(residual, x, w.t())
        else:
            y = x.new_empty(t, w.shape[0])
            if r and residual is None:
                torch.mm(x[:r], w.t(), out=y[:r])
            elif r:
                torch.addmm(residual[:r], x[:r], w.t(), out=y[:r])
            if residual is None:
                y[r:].zero_()
            else:
                y[r:].copy_(residual[r:])
        self._shadow(active, lambda m, p: m.apply_linear(p, site, layer, x, y))
        return y

    @staticmethod
    def _output_transforms(active: list[tuple[PetMethod, Any]]) -> list[tuple[PetMethod, Any]]:
        """The plans that transform an output site's ``y + bias`` before the residual. A None
        plan (IA3 tasks without output scales) neither runs nor blocks the fused paths."""
        return [(m, p) for m, p in active if m.has_output_transform and p is not None]

    def _shadow(self, active: list[tuple[PetMethod, Any]], fn: Any) -> None:
        """Run ``fn(method, plan)`` for every plan: in order, or over the PetS streams."""
        if self.streams is not None:
            self.streams.run(active, fn)
            return
        for method, plan in active:
            fn(method, plan)

    def _output(
        self,
        site: str,
        ln: str,
        layer: int,
        y: torch.Tensor,
        residual: torch.Tensor,
        batch: Batch,
        sp: SegmentParams,
        active: list[tuple[PetMethod, Any]],
    ) -> torch.Tensor:
        """``LN(transform(y + bias) + residual)`` of an output site. ``y``, residual ``[T, H]``.

        No output transform in the batch: ``y`` already holds the residual (the GEMM added
        it, :meth:`_output_transforms`), one epilogue op. One PET type's transform (and no
        shadow streams): that type's :meth:`PetMethod.fused_output` if it has one (adapters:
        one op for the whole site). Otherwise bias, each type's ``apply_output``, LayerNorm.
        """
        K = self.ctx.ops
        ep = OutputEpilogue(
            y=y,
            residual=residual,
            bias=self.ctx.bias.tables[site][layer],
            seg_bias=sp.bias,
            gamma=self.ctx.ln.tables[f"{ln}.gamma"][layer],
            beta=self.ctx.ln.tables[f"{ln}.beta"][layer],
            seg_ln=sp.ln,
            seg_indptr=batch.seg_indptr,
            eps=self.spec.eps,
        )
        transforms = self._output_transforms(active)
        if not transforms:
            return K.bias_residual_layernorm(
                y, None, ep.bias, ep.gamma, ep.beta, ep.seg_indptr, ep.seg_bias, ep.seg_ln, ep.eps
            )
        if self.fuse_outputs and self.streams is None and len(transforms) == 1:
            method, plan = transforms[0]
            out = method.fused_output(plan, site, layer, ep)
            if out is not None:
                return out
        h = K.bias_act(y, ep.bias, ep.seg_indptr, ep.seg_bias, None, None, 0)
        self._shadow(transforms, lambda m, p: m.apply_output(p, site, layer, h))
        return K.bias_residual_layernorm(
            h, residual, None, ep.gamma, ep.beta, ep.seg_indptr, None, ep.seg_ln, ep.eps
        )

    def _layer(
        self,
        layer: int,
        x: torch.Tensor,
        batch: Batch,
        sp: SegmentParams,
        active: list[tuple[PetMethod, Any]],
    ) -> torch.Tensor:
        K = self.ctx.ops
        bias, scale = self.ctx.bias.tables, self.ctx.scale.tables
        if sp.shared_bias:  # the bias in the GEMM epilogue
            qkv = self._linear("qkv", layer, x, batch, active, bias=bias["qkv"][layer, 0])
        else:
            qkv = self._linear("qkv", layer, x, batch, active)
            qkv = K.bias_act(
                qkv,
                bias["qkv"][layer],
                batch.seg_indptr,
                sp.bias,
                None if sp.scale is None else scale["qkv"][layer],
                sp.scale,
                0,
            )
        a = self._attention(qkv, batch)
        # No output transform: the residual is the output GEMMs' C operand (see _output).
        fold = not self._output_transforms(active)
        y = self._linear("attn_out", layer, a, batch, active, residual=x if fold else None)
        h = self._output("attn_out", "attn_ln", layer, y, x, batch, sp, active)
        if sp.gelu_in_gemm:  # no delta at ffn_in: bias and GELU in the GEMM's epilogue
            w = self.w.linear["ffn_in"][layer]
            i = torch._addmm_activation(bias["ffn_in"][layer, 0], h, w.t(), use_gelu=True)
        else:
            i = self._linear("ffn_in", layer, h, batch, active)
            i = K.bias_act(
                i,
                bias["ffn_in"][layer],
                batch.seg_indptr,
                sp.bias,
                None if sp.scale is None else scale["ffn_in"][layer],
                sp.scale,
                self.act,
            )
        o = self._linear("ffn_out", layer, i, batch, active, residual=h if fold else None)
        return self._output("ffn_out", "ffn_ln", layer, o, h, batch, sp, active)

    def _attention(self, qkv: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Bidirectional attention per sequence. ``qkv`` ``[T, 3H]`` -> ``[T, H]``."""
        t = qkv.shape[0]
        nh, hd = self.spec.heads, self.spec.head_dim
        q, k, v = qkv.view(t, 3, nh, hd).unbind(1)  # each [T, nh, hd]
        if self.packed_attention and batch.valid_lens is None:
            cu, lmax = batch.cu_seqlens, batch.max_seqlen
            if self.flash_attention and lmax > EFFICIENT_MAX_SEQLEN:
                out = _varlen_attn(q, k, v, cu, cu, lmax, lmax)
                assert isinstance(out, torch.Tensor)  # no aux outputs requested
            else:
                out = _efficient_attention(q, k, v, cu, lmax)
            return out.reshape(t, nh * hd)
        b, lmax = batch.num_seqs, batch.max_seqlen
        if b * lmax == t:  # every sequence as long (equal lengths, or the padded layout)
            qb, kb, vb = (u.view(b, lmax, nh, hd).transpose(1, 2) for u in (q, k, v))
            mask = None
            if batch.valid_lens is not None:  # the pads are keys no query may attend to
                cols = torch.arange(lmax, device=qkv.device)
                mask = (cols[None, :] < batch.valid_lens[:, None])[:, None, None, :]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # [B, nh, L, hd]
            return o.transpose(1, 2).reshape(t, nh * hd)
        # Ragged batch, no packed attention (CPU; heads not a multiple of 8): scatter to [B, L].
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(b, device=qkv.device), lengths, output_size=t)
        pos = batch.positions
        padded = qkv.new_zeros(b, lmax, 3, nh, hd)
        padded[seq, pos] = qkv.view(t, 3, nh, hd)
        qp, kp, vp = (padded[:, :, i].transpose(1, 2) for i in range(3))  # [B, nh, L, hd]
        keep = torch.arange(lmax, device=qkv.device)[None, :] < lengths[:, None]  # [B, L]
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep[:, None, None, :])
        return o.transpose(1, 2)[seq, pos].reshape(t, nh * hd)
