"""Per-task heads: sequence classification or embedding, computed for a whole batch at once.

* ``classification``: ``logits = W_c @ tanh(W_p @ h_cls + b_p) + b_c`` (HF
  ``BertForSequenceClassification``; the pooler is the backbone's unless the task carries
  ``pooler.dense.*``). ``num_labels`` may differ per task: classifier rows are pooled at the
  widest ``num_labels`` seen and each row is sliced to its task's width.
* ``embedding``: CLS or mean pooling of the last hidden state, optionally L2-normalised.

Manifest ``head`` objects: ``{"type": "classification", "num_labels": 3}`` or
``{"type": "embedding", "pooling": "mean", "normalize": true}``. Tensors:
``classifier.weight`` ``[C, H]``, ``classifier.bias`` ``[C]``, optional
``pooler.dense.weight`` ``[H, H]`` and ``pooler.dense.bias`` ``[H]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .backbone import BackboneSpec
from .errors import TaskError, short
from .pet.base import check_tensor
from .pet.meta import SlotMeta
from .tables import Allocation, FlatPool

HEAD_TENSORS = {"classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"}
CLASSIFY, EMBED = 0, 1


@dataclass(frozen=True)
class HeadConfig:
    kind: str  # "classification" | "embedding"
    num_labels: int = 0
    pooling: str = "cls"  # embedding only: "cls" | "mean"
    normalize: bool = False

    @property
    def out_dim(self) -> int:
        return self.num_labels if self.kind == "classification" else -1

    @staticmethod
    def parse(obj: Any) -> HeadConfig:
        if not isinstance(obj, dict) or obj.get("type") not in ("classification", "embedding"):
            raise TaskError(
                f"head must be {{'type': 'classification'|'embedding', ...}}, got {short(obj)}"
            )
        if obj["type"] == "classification":
            n = obj.get("num_labels")
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
                raise TaskError(
                    f"classification head needs integer num_labels in [1, 4096], got {short(n)}"
                )
            return HeadConfig("classification", num_labels=n)
        pooling = obj.get("pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise TaskError(f"embedding head pooling {short(pooling)}; expected 'cls' or 'mean'")
        normalize = obj.get("normalize", False)
        if not isinstance(normalize, bool):
            raise TaskError(f"embedding head normalize must be true/false, got {short(normalize)}")
        return HeadConfig("embedding", pooling=pooling, normalize=normalize)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "classification":
            return {"type": "classification", "num_labels": self.num_labels}
        return {"type": "embedding", "pooling": self.pooling, "normalize": self.normalize}


def validate_head(head: HeadConfig, spec: BackboneSpec, tensors: dict[str, torch.Tensor]) -> None:
    h = spec.hidden
    if head.kind == "classification":
        for name, shape in (
            ("classifier.weight", (head.num_labels, h)),
            ("classifier.bias", (head.num_labels,)),
        ):
            if name not in tensors:
                raise TaskError(f"classification head needs tensor {name!r} of shape {shape}")
            check_tensor(name, tensors[name], shape)
    elif "classifier.weight" in tensors or "classifier.bias" in tensors:
        raise TaskError(
            "embedding head takes no classifier tensors; drop them or declare a classification head"
        )
    has_p = ["pooler.dense.weight" in tensors, "pooler.dense.bias" in tensors]
    if any(has_p) and not all(has_p):
        raise TaskError("pooler.dense.weight and pooler.dense.bias must come together")
    if all(has_p):
        if head.kind != "classification":
            raise TaskError("only classification heads use a pooler")
        check_tensor("pooler.dense.weight", tensors["pooler.dense.weight"], (h, h))
        check_tensor("pooler.dense.bias", tensors["pooler.dense.bias"], (h,))


@dataclass
class HeadPlan:
    """One batch's head work, built on the host by :meth:`HeadTable.plan`.

    Device tensors are ``[B]`` rows of the batch (uploaded); the flags say which head kinds
    run, so :meth:`HeadTable.compute` launches a fixed sequence of kernels for them.
    """

    cu_seqlens: torch.Tensor  # [B + 1] int32, device
    valid_lens: torch.Tensor | None  # [B] int64, device (padded path only)
    tasks: torch.Tensor  # [B] int64, device: task slot per sequence
    width: torch.Tensor  # [B] int32, host: output width per sequence
    classify: bool  # some sequence has a classification head
    own_rows: torch.Tensor | None  # [R] int64, device: sequences with their own pooler
    own_offs: torch.Tensor | None  # [R] int64, device: their pooler's pool offset
    embed_sel: torch.Tensor | None  # [B] bool, device: embedding-head sequences (None: none)
    use_mean: torch.Tensor | None  # [B] bool, device
    normalize: torch.Tensor | None  # [B] bool, device


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
        self.width = SlotMeta((), torch.int32, 0)
        self.mean = SlotMeta((), torch.bool, False)
        self.normalize = SlotMeta((), torch.bool, False)
        self.pooler_off = SlotMeta((), torch.int64, -1)

    def add(
        self, slot: int, head: HeadConfig, tensors: dict[str, torch.Tensor]
    ) -> list[tuple[FlatPool, Allocation]]:
        allocs: list[tuple[FlatPool, Allocation]] = []
        self._ensure(slot + 1, max(head.num_labels, 1))
        self.kind[slot] = CLASSIFY if head.kind == "classification" else EMBED
        self.width[slot] = head.num_labels if head.kind == "classification" else self.spec.hidden
        self.mean[slot] = head.pooling == "mean"
        self.normalize[slot] = head.normalize
        self.cls_w[slot].zero_()
        self.cls_b[slot].zero_()
        if head.kind == "classification":
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
        for meta in (self.kind, self.width, self.mean, self.normalize, self.pooler_off):
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

    def plan(
        self,
        cu_seqlens: torch.Tensor,
        seq_task_cpu: torch.Tensor,
        valid_lens: torch.Tensor | None,
        upload: Callable[[torch.Tensor], torch.Tensor],
    ) -> HeadPlan:
        """Host half of the heads: which kinds run and their index rows, uploaded (the device
        half is :meth:`compute`).

        Args:
            cu_seqlens: ``[B + 1]`` int32 (device).
            seq_task_cpu: ``[B]`` task slot of each sequence (host).
            valid_lens: ``[B]`` real lengths on the padded path (pads are not pooled).
            upload: host tensor -> device tensor (the forward's :class:`~pets.staging.Stager`).
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
        return HeadPlan(
            cu_seqlens=cu_seqlens,
            valid_lens=valid_lens,
            tasks=upload(seq_task_cpu),
            width=self.width[seq_task_cpu],
            classify=classify,
            own_rows=own_rows,
            own_offs=own_offs,
            embed_sel=upload(embed_rows) if embed else None,
            use_mean=upload(self.mean[seq_task_cpu]) if embed else None,
            normalize=upload(self.normalize[seq_task_cpu]) if embed else None,
        )

    def compute(self, hidden: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
        """Device half: ``hidden [T, H]`` -> ``out [B, D]`` float32; launches only (no host
        reads, no uploads), so a CUDA graph can capture it."""
        b = plan.tasks.shape[0]
        h = self.spec.hidden
        dev = hidden.device
        cu_seqlens = plan.cu_seqlens
        starts = cu_seqlens[:-1].long()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        cls = hidden[starts]  # [B, H]
        out = torch.zeros(b, max(h, self.cls_w.shape[1]), device=dev, dtype=torch.float32)
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
            out[:, : logits.shape[1]] = logits
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
        return out
