"""Per-task heads, computed for a whole batch at once (no per-task loops).

Head types (manifest ``head.type``); ``C`` is ``num_labels``, ``H`` the hidden size:

* ``classification``: ``logits = W_c @ tanh(W_p @ h_cls + b_p) + b_c`` (HF
  ``BertForSequenceClassification``, single-label; the pooler is the backbone's unless the
  task carries ``pooler.dense.*``). Output ``[C]``; ``"output": "probabilities"`` applies a
  softmax over the task's ``C`` labels.
* ``multi_label``: the same logits (HF ``problem_type="multi_label_classification"``); with
  ``"output": "probabilities"`` each label gets its own sigmoid.
* ``regression``: the same affine map read as ``C >= 1`` raw scores (HF
  ``problem_type="regression"``); ``num_labels`` defaults to 1; no probabilities.
* ``token_classification``: ``W_c @ h_t + b_c`` for every input token ``t`` (HF
  ``BertForTokenClassification``: no pooler). Output ``[L, C]`` per sequence, ``L`` its own
  token count ([CLS] and [SEP] included, padding never); ``"probabilities"``: a softmax per
  token.
* ``embedding``: CLS or mean pooling of the last hidden state, optionally L2-normalised.

``"output"`` is ``"logits"`` (default: what HF returns) or ``"probabilities"``. ``"pairs":
true`` declares a sentence-pair task (a cross-encoder or NLI model): every head accepts pairs
(``TEXT_PAIR``, ``TOKEN_TYPE_IDS``), the flag only adds ``token_type_ids`` to an ONNX export.

Tensors: ``classifier.weight`` ``[C, H]``, ``classifier.bias`` ``[C]`` (every head but
``embedding``), optional ``pooler.dense.weight`` ``[H, H]`` and ``pooler.dense.bias`` ``[H]``
(pooled heads only). Classifier rows are pooled at the widest ``C`` seen; each row is sliced
to its task's width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import BackboneSpec
from .errors import TaskError, short
from .graphs import HOST_ONLY
from .pet.base import check_tensor
from .pet.meta import SlotMeta
from .tables import Allocation, FlatPool

HEAD_TENSORS = {"classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"}
POOLED_KINDS = ("classification", "multi_label", "regression")
"""Heads over the pooled [CLS] state: the pooler, then ``classifier`` (one output row)."""
HEAD_KINDS = (*POOLED_KINDS, "token_classification", "embedding")
OUTPUTS = ("logits", "probabilities")
CLASSIFY, EMBED, TOKENS = 0, 1, 2  # HeadTable.kind codes
ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID = 0, 1, 2  # HeadTable.act codes


@dataclass(frozen=True)
class HeadConfig:
    kind: str  # one of HEAD_KINDS
    num_labels: int = 0  # C: labels, scores, or per-token classes (0 for embedding)
    pooling: str = "cls"  # embedding only: "cls" | "mean"
    normalize: bool = False  # embedding only
    output: str = "logits"  # "logits" (HF's output) | "probabilities" (softmax / sigmoid)
    pairs: bool = False  # a sentence-pair task (informational; ONNX adds token_type_ids)

    @property
    def has_classifier(self) -> bool:
        """Carries ``classifier.weight [C, H]`` and ``classifier.bias [C]``."""
        return self.kind != "embedding"

    @property
    def out_dim(self) -> int:
        return self.num_labels if self.has_classifier else -1

    @property
    def activation(self) -> int:
        """The :data:`ACT_SOFTMAX` / :data:`ACT_SIGMOID` / :data:`ACT_NONE` code applied."""
        if self.output != "probabilities":
            return ACT_NONE
        return ACT_SIGMOID if self.kind == "multi_label" else ACT_SOFTMAX

    @staticmethod
    def parse(obj: Any) -> HeadConfig:
        if not isinstance(obj, dict) or obj.get("type") not in HEAD_KINDS:
            raise TaskError(
                f"head must be {{'type': one of {list(HEAD_KINDS)}, ...}}, got {short(obj)}; "
                "see docs/task-store.md#heads"
            )
        kind = obj["type"]
        allowed = (
            {"type", "pooling", "normalize", "pairs"}
            if kind == "embedding"
            else {"type", "num_labels", "output", "pairs"}
        )
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise TaskError(
                f"{kind} head takes the keys {sorted(allowed)}, got also {short(unknown)}; "
                "drop them"
            )
        pairs = obj.get("pairs", False)
        if not isinstance(pairs, bool):
            raise TaskError(f"head pairs must be true/false, got {short(pairs)}")
        if kind != "embedding":
            n = obj.get("num_labels", 1 if kind == "regression" else None)
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
                raise TaskError(
                    f"{kind} head needs integer num_labels in [1, 4096], got {short(n)}"
                )
            output = obj.get("output", "logits")
            if output not in OUTPUTS:
                raise TaskError(
                    f"head output {short(output)}; expected 'logits' (default) or 'probabilities'"
                )
            if kind == "regression" and output != "logits":
                raise TaskError(
                    "a regression head returns raw scores; drop 'output' or set it to 'logits'"
                )
            return HeadConfig(kind, num_labels=n, output=output, pairs=pairs)
        pooling = obj.get("pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise TaskError(f"embedding head pooling {short(pooling)}; expected 'cls' or 'mean'")
        normalize = obj.get("normalize", False)
        if not isinstance(normalize, bool):
            raise TaskError(f"embedding head normalize must be true/false, got {short(normalize)}")
        return HeadConfig("embedding", pooling=pooling, normalize=normalize, pairs=pairs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any]
        if self.has_classifier:
            out = {"type": self.kind, "num_labels": self.num_labels}
            if self.output != "logits":
                out["output"] = self.output
        else:
            out = {"type": "embedding", "pooling": self.pooling, "normalize": self.normalize}
        if self.pairs:
            out["pairs"] = True
        return out


def validate_head(head: HeadConfig, spec: BackboneSpec, tensors: dict[str, torch.Tensor]) -> None:
    h = spec.hidden
    if head.has_classifier:
        for name, shape in (
            ("classifier.weight", (head.num_labels, h)),
            ("classifier.bias", (head.num_labels,)),
        ):
            if name not in tensors:
                raise TaskError(f"{head.kind} head needs tensor {name!r} of shape {shape}")
            check_tensor(name, tensors[name], shape)
    elif "classifier.weight" in tensors or "classifier.bias" in tensors:
        raise TaskError(
            "embedding head takes no classifier tensors; drop them or declare a classification head"
        )
    has_p = ["pooler.dense.weight" in tensors, "pooler.dense.bias" in tensors]
    if any(has_p) and not all(has_p):
        raise TaskError("pooler.dense.weight and pooler.dense.bias must come together")
    if all(has_p):
        if head.kind not in POOLED_KINDS:
            raise TaskError(
                f"a {head.kind} head uses no pooler; only {', '.join(POOLED_KINDS)} heads "
                "take pooler.dense.*: drop them"
            )
        check_tensor("pooler.dense.weight", tensors["pooler.dense.weight"], (h, h))
        check_tensor("pooler.dense.bias", tensors["pooler.dense.bias"], (h,))


@dataclass
class HeadPlan:
    """One batch's head work, built on the host by :meth:`HeadTable.plan`.

    Device tensors are ``[B]`` rows of the batch (uploaded); the flags say which head kinds
    run, so :meth:`HeadTable.compute` launches a fixed sequence of kernels for them. Token
    heads add ``Tt`` rows (the real tokens of their ``Bt`` sequences) after the ``B``
    sequence rows of the output.
    """

    cu_seqlens: torch.Tensor  # [B + 1] int32, device
    valid_lens: torch.Tensor | None  # [B] int64, device (padded path only)
    tasks: torch.Tensor  # [B] int64, device: task slot per sequence
    width: torch.Tensor  # [B] int32, host: output width per sequence
    classify: bool  # some sequence has a pooled (classifier) head
    own_rows: torch.Tensor | None  # [R] int64, device: sequences with their own pooler
    own_offs: torch.Tensor | None  # [R] int64, device: their pooler's pool offset
    embed_sel: torch.Tensor | None  # [B] bool, device: embedding-head sequences (None: none)
    use_mean: torch.Tensor | None  # [B] bool, device
    normalize: torch.Tensor | None  # [B] bool, device
    act: torch.Tensor | None = None  # [B] int8, device: ACT_* per sequence (None: all raw)
    width_dev: torch.Tensor | None = None  # [B] int64, device (with act)
    tok_seq: torch.Tensor | None = None  # [Bt] int64, device: token-head sequences
    tok_src: torch.Tensor | None = None  # [Tt] int64, device: their tokens' flat rows
    tok_row: torch.Tensor | None = None  # [Tt] int64, device: each token's index in tok_seq
    tok_pos: torch.Tensor | None = None  # [Tt] int64, device: each token's position
    tok_lmax: int = 0  # longest token-head sequence (real tokens)
    # Host only: where sequence j's token rows start in the token block (-1: none), and count.
    tok_start: torch.Tensor | None = field(default=None, metadata={HOST_ONLY: True})
    tok_len: torch.Tensor | None = field(default=None, metadata={HOST_ONLY: True})


class HeadTable:
    """All tasks' heads, pooled for batched evaluation."""

    def __init__(
        self,
        spec: BackboneSpec,
        device: torch.device,
        dtype: torch.dtype,
        pooler_w: torch.Tensor | None,
        pooler_b: torch.Tensor | None,
    ) -> None:
        self.spec, self.device, self.dtype = spec, device, dtype
        h = spec.hidden
        self.pooler_w = (
            pooler_w if pooler_w is not None else torch.zeros(h, h, device=device, dtype=dtype)
        )
        self.pooler_b = (
            pooler_b if pooler_b is not None else torch.zeros(h, device=device, dtype=dtype)
        )
        self.cls_w = torch.zeros(16, 1, h, device=device, dtype=dtype)  # [cap, Cmax, H]
        self.cls_b = torch.zeros(16, 1, device=device, dtype=dtype)
        self.own_pooler = FlatPool(device, dtype, capacity=h * h + h)
        self.kind = SlotMeta((), torch.int8, CLASSIFY)
        self.act = SlotMeta((), torch.int8, ACT_NONE)
        self.width = SlotMeta((), torch.int32, 0)
        self.mean = SlotMeta((), torch.bool, False)
        self.normalize = SlotMeta((), torch.bool, False)
        self.pooler_off = SlotMeta((), torch.int64, -1)

    def add(
        self, slot: int, head: HeadConfig, tensors: dict[str, torch.Tensor]
    ) -> list[tuple[FlatPool, Allocation]]:
        allocs: list[tuple[FlatPool, Allocation]] = []
        self._ensure(slot + 1, max(head.num_labels, 1))
        kinds = {"embedding": EMBED, "token_classification": TOKENS}
        self.kind[slot] = kinds.get(head.kind, CLASSIFY)
        self.act[slot] = head.activation
        self.width[slot] = head.num_labels if head.has_classifier else self.spec.hidden
        self.mean[slot] = head.pooling == "mean"
        self.normalize[slot] = head.normalize
        self.cls_w[slot].zero_()
        self.cls_b[slot].zero_()
        if head.has_classifier:
            n = head.num_labels
            self.cls_w[slot, :n] = tensors["classifier.weight"].to(self.device, self.dtype)
            self.cls_b[slot, :n] = tensors["classifier.bias"].to(self.device, self.dtype)
        if "pooler.dense.weight" in tensors:
            alloc = self.own_pooler.put(
                torch.cat(
                    [tensors["pooler.dense.weight"].reshape(-1), tensors["pooler.dense.bias"]]
                )
            )
            allocs.append((self.own_pooler, alloc))
            self.pooler_off[slot] = alloc.offset
        else:
            self.pooler_off[slot] = -1
        return allocs

    def remove(self, slot: int) -> None:
        for meta in (self.kind, self.act, self.width, self.mean, self.normalize, self.pooler_off):
            meta.reset(slot)

    def row_bytes(self) -> int:
        return (self.cls_w.shape[1] * (self.spec.hidden + 1)) * self.cls_w.element_size()

    def _ensure(self, slots: int, labels: int) -> None:
        cap, cmax, h = self.cls_w.shape
        if slots <= cap and labels <= cmax:
            return
        new_cap = max(cap, 1 << (slots - 1).bit_length())
        new_c = max(cmax, labels)
        w = torch.zeros(new_cap, new_c, h, device=self.device, dtype=self.dtype)
        b = torch.zeros(new_cap, new_c, device=self.device, dtype=self.dtype)
        w[:cap, :cmax], b[:cap, :cmax] = self.cls_w, self.cls_b
        self.cls_w, self.cls_b = w, b

    def token_head(self, slot: int) -> bool:
        """Whether task ``slot``'s head classifies tokens (its output rows follow the
        sequence's length)."""
        return int(self.kind.rows(np.array([slot]))[0]) == TOKENS

    def out_width(self) -> int:
        """``D`` of :meth:`compute`'s output: the widest head row (hidden or labels)."""
        return max(self.spec.hidden, self.cls_w.shape[1])

    def plan(
        self,
        cu_seqlens: torch.Tensor,
        seq_task_cpu: torch.Tensor,
        valid_lens: torch.Tensor | None,
        upload: Callable[[torch.Tensor], torch.Tensor],
        cu_seqlens_cpu: torch.Tensor | None = None,
        valid_lens_cpu: torch.Tensor | None = None,
    ) -> HeadPlan:
        """Host half of the heads: which kinds run and their index rows, uploaded (the device
        half is :meth:`compute`).

        Args:
            cu_seqlens: ``[B + 1]`` int32 (device).
            seq_task_cpu: ``[B]`` task slot of each sequence (host).
            valid_lens: ``[B]`` real lengths on the padded path (pads are not pooled).
            upload: host tensor -> device tensor (the forward's :class:`~pets.staging.Stager`).
            cu_seqlens_cpu: ``[B + 1]`` int64 host copy of ``cu_seqlens``; needed when a
                sequence has a token head.
            valid_lens_cpu: ``[B]`` host copy of ``valid_lens`` (padded path).
        """
        kind = self.kind[seq_task_cpu]
        classify = bool((kind == CLASSIFY).any())
        embed_rows = kind == EMBED
        own_rows: torch.Tensor | None = None
        own_offs: torch.Tensor | None = None
        if classify:
            own = self.pooler_off[seq_task_cpu]
            rows = torch.nonzero(own >= 0).flatten()
            if rows.numel():  # tasks with their own (fine-tuned) pooler: gathered, no loop
                own_rows, own_offs = upload(rows), upload(own[rows])
        embed = bool(embed_rows.any())
        width = self.width[seq_task_cpu]
        act = self.act[seq_task_cpu]
        plan = HeadPlan(
            cu_seqlens=cu_seqlens,
            valid_lens=valid_lens,
            tasks=upload(seq_task_cpu),
            width=width,
            classify=classify,
            own_rows=own_rows,
            own_offs=own_offs,
            embed_sel=upload(embed_rows) if embed else None,
            use_mean=upload(self.mean[seq_task_cpu]) if embed else None,
            normalize=upload(self.normalize[seq_task_cpu]) if embed else None,
        )
        if bool((act != ACT_NONE).any()):
            plan.act, plan.width_dev = upload(act), upload(width.long())
        tok = torch.nonzero(kind == TOKENS).flatten()
        if tok.numel():
            if cu_seqlens_cpu is None:
                raise ValueError("a token head needs cu_seqlens_cpu (the host sequence bounds)")
            starts = cu_seqlens_cpu[:-1].long()
            lens = (
                valid_lens_cpu.long()
                if valid_lens_cpu is not None
                else (cu_seqlens_cpu[1:] - cu_seqlens_cpu[:-1]).long()
            )
            tl = lens[tok]  # real tokens of each token-head sequence: padding is never read
            row = torch.repeat_interleave(torch.arange(tok.numel()), tl)
            first = torch.cumsum(tl, 0) - tl
            pos = torch.arange(int(tl.sum())) - first[row]
            plan.tok_seq = upload(tok)
            plan.tok_src = upload(starts[tok][row] + pos)
            plan.tok_row, plan.tok_pos = upload(row), upload(pos)
            plan.tok_lmax = int(tl.max())
            plan.tok_start = torch.full_like(seq_task_cpu, -1)
            plan.tok_start[tok] = first
            plan.tok_len = torch.zeros_like(seq_task_cpu)
            plan.tok_len[tok] = tl
        return plan

    def compute(self, hidden: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
        """Device half: ``hidden [T, H]`` -> ``out [B + Tt, D]`` float32 (``Tt``: the real
        tokens of token-head sequences, 0 if none). Launches only (no host reads, no
        uploads), so a CUDA graph can capture it."""
        b = plan.tasks.shape[0]
        h = self.spec.hidden
        dev = hidden.device
        cu_seqlens = plan.cu_seqlens
        starts = cu_seqlens[:-1].long()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        cls = hidden[starts]  # [B, H]
        c = self.cls_w.shape[1]
        out = torch.zeros(b, self.out_width(), device=dev, dtype=torch.float32)
        if plan.classify:
            pooled = torch.tanh(F.linear(cls, self.pooler_w, self.pooler_b)).float()
            if plan.own_rows is not None and plan.own_offs is not None:
                idx = plan.own_offs[:, None] + torch.arange(h * h + h, device=dev)[None, :]
                p = self.own_pooler.data[idx].float()
                pw, pb = p[:, : h * h].view(-1, h, h), p[:, h * h :]
                x = cls[plan.own_rows].float()[:, :, None]  # [R, H, 1]
                pooled[plan.own_rows] = torch.tanh(torch.bmm(pw, x)[:, :, 0] + pb)
            w = self.cls_w[plan.tasks].float()  # [B, C, H]
            logits = torch.bmm(w, pooled[:, :, None])[:, :, 0] + self.cls_b[plan.tasks].float()
            if plan.act is not None and plan.width_dev is not None:
                logits = _activate(logits, plan.act, plan.width_dev)
            out[:, :c] = logits
        if plan.embed_sel is not None:
            assert plan.use_mean is not None and plan.normalize is not None
            seq = torch.repeat_interleave(
                torch.arange(b, device=dev), lengths, output_size=hidden.shape[0]
            )
            hid = hidden.float()
            n = lengths
            if plan.valid_lens is not None:  # zero the pads before summing
                pos = torch.arange(hidden.shape[0], device=dev) - starts[seq]
                hid = hid * (pos < plan.valid_lens[seq])[:, None]
                n = plan.valid_lens
            sums = torch.zeros(b, h, device=dev, dtype=torch.float32).index_add_(0, seq, hid)
            mean = sums / n[:, None].float()
            emb = torch.where(plan.use_mean[:, None], mean, cls.float())
            emb = torch.where(plan.normalize[:, None], F.normalize(emb, dim=-1), emb)
            out[:, :h] = torch.where(plan.embed_sel[:, None], emb, out[:, :h])
        if plan.tok_seq is None:
            return out
        assert plan.tok_src is not None and plan.tok_row is not None and plan.tok_pos is not None
        # Token heads: each sequence's tokens against its task's classifier, one batched GEMM
        # over [Bt, Lmax, H] (the weights are gathered per sequence, never per token).
        bt = plan.tok_seq.shape[0]
        padded = torch.zeros(bt, plan.tok_lmax, h, device=dev, dtype=torch.float32)
        padded[plan.tok_row, plan.tok_pos] = hidden[plan.tok_src].float()
        task = plan.tasks[plan.tok_seq]
        w = self.cls_w[task].float()  # [Bt, C, H]
        y = torch.bmm(padded, w.transpose(1, 2)) + self.cls_b[task].float()[:, None, :]
        tok = y[plan.tok_row, plan.tok_pos]  # [Tt, C]
        if plan.act is not None and plan.width_dev is not None:
            seq_of = plan.tok_seq[plan.tok_row]
            tok = _activate(tok, plan.act[seq_of], plan.width_dev[seq_of])
        tok_out = torch.zeros(tok.shape[0], out.shape[1], device=dev, dtype=torch.float32)
        tok_out[:, :c] = tok
        return torch.cat([out, tok_out])


def _activate(logits: torch.Tensor, act: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits [N, C]`` through their head's activation: softmax over the row's own
    ``width`` labels (the pool's padding columns masked out), sigmoid, or none.

    Args:
        act: ``[N]`` int8 :data:`ACT_NONE` / :data:`ACT_SOFTMAX` / :data:`ACT_SIGMOID`.
        width: ``[N]`` int64 labels of each row's task.
    """
    cols = torch.arange(logits.shape[1], device=logits.device)
    real = cols[None, :] < width[:, None]
    soft = torch.softmax(logits.masked_fill(~real, float("-inf")), dim=-1)
    a = act[:, None].long()
    return torch.where(
        a == ACT_SOFTMAX, soft, torch.where(a == ACT_SIGMOID, torch.sigmoid(logits), logits)
    )
