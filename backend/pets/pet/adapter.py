"""Bottleneck adapters (Houlsby; Pfeiffer when only the FFN site is adapted).

After the attention-output and FFN-output dense layers (bias included: the exact method,
unlike PetS which dropped the dense bias), ``h = h + up(act(down(h)))``, then the residual
LayerNorm with the task's gamma/beta. Tasks of different bottlenecks share one grouped
down and one grouped up launch per site (one pair per distinct activation in the batch).

Hyper-parameters: ``activation`` (``relu`` | ``gelu`` | ``silu`` | ``gelu_new``; default
``relu``). Tensors, for site module ``attention.output`` and/or ``output`` (the same sites
at every layer):
    ``encoder.layer.{i}.{site}.adapter.down.weight`` ``[r, H]``, ``...down.bias`` ``[r]``,
    ``encoder.layer.{i}.{site}.adapter.up.weight`` ``[H, r]``, ``...up.bias`` ``[H]``,
plus any BitFit-style LayerNorm / bias tensors (Houlsby trains the LayerNorms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from petops.reference import ACTIVATIONS

from ..errors import TaskError
from .base import (
    LoadedTask,
    PetMethod,
    alloc_bias_ln,
    bias_names,
    check_bias_ln,
    check_known,
    check_tensor,
    layer_key,
    ln_names,
    register_pet,
)
from .meta import SlotMeta

ADAPTER_SITES = {"attn_out": "attention.output", "ffn_out": "output"}
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


@dataclass
class _Group:
    seg: torch.Tensor  # [I] int32
    offs: torch.Tensor  # [4, L, I] int64: down.w, down.b, up.w, up.b
    rank: torch.Tensor  # [I] int32
    act: int
    max_rank: int
    zeros: torch.Tensor  # [I] int32
    out_dim: torch.Tensor  # [I] int32
    ones: torch.Tensor  # [I] float32


@dataclass
class AdapterPlan:
    seg_indptr: torch.Tensor
    sites: dict[str, list[_Group]]


@register_pet
class Adapter(PetMethod):
    name = "adapter"
    code = 4
    has_output_transform = True

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        L = ctx.spec.layers
        self.pool = ctx.pool()
        self.offs = SlotMeta((len(ADAPTER_SITES), len(PARTS), L), torch.int64, -1)
        self.present = SlotMeta((len(ADAPTER_SITES),), torch.bool, False)
        self.rank = SlotMeta((), torch.int32, 0)
        self.act = SlotMeta((), torch.int32, 0)

    def _key(self, i: int, site: str, part: str) -> str:
        return layer_key(i, ADAPTER_SITES[site], f"adapter.{part}")

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        spec = self.ctx.spec
        act = hparams.get("activation", "relu")
        if act not in ACTIVATIONS or act == "none":
            raise TaskError(
                f"adapter activation {act!r} is not supported; use one of "
                f"{sorted(set(ACTIVATIONS) - {'none'})}"
            )
        names = {
            self._key(i, s, p) for i in range(spec.layers) for s in ADAPTER_SITES for p in PARTS
        }
        check_known(tensors, names | set(bias_names(spec)) | set(ln_names(spec)), self.name)
        check_bias_ln(spec, tensors)
        sites = [s for s in ADAPTER_SITES if self._key(0, s, "down.weight") in tensors]
        if not sites:
            raise TaskError(
                "adapter task has no adapter.down.weight at layer 0; adapters must "
                "sit at the same sites in every layer"
            )
        r = tensors[self._key(0, sites[0], "down.weight")].shape[0]
        h = spec.hidden
        for i in range(spec.layers):
            for s in ADAPTER_SITES:
                for p, shape in zip(PARTS, ((r, h), (r,), (h, r), (h,)), strict=True):
                    name = self._key(i, s, p)
                    if (name in tensors) != (s in sites):
                        raise TaskError(
                            f"adapter tensor {name!r} is "
                            f"{'un' if s in sites else ''}expected: every layer "
                            f"must carry adapters at the same sites ({sites})"
                        )
                    if s in sites:
                        check_tensor(name, tensors[name], shape)

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        spec = self.ctx.spec
        loaded = LoadedTask()
        alloc_bias_ln(self.ctx, tensors, loaded)
        offs = torch.full((len(ADAPTER_SITES), len(PARTS), spec.layers), -1, dtype=torch.int64)
        present = torch.zeros(len(ADAPTER_SITES), dtype=torch.bool)
        rank = 0
        for si, s in enumerate(ADAPTER_SITES):
            if self._key(0, s, "down.weight") not in tensors:
                continue
            present[si] = True
            rank = tensors[self._key(0, s, "down.weight")].shape[0]
            for i in range(spec.layers):
                for pi, p in enumerate(PARTS):
                    alloc = self.pool.put(tensors[self._key(i, s, p)])
                    loaded.allocations.append((self.pool, alloc))
                    offs[si, pi, i] = alloc.offset
        self.offs[slot], self.present[slot], self.rank[slot] = offs, present, rank
        self.act[slot] = ACTIVATIONS[hparams.get("activation", "relu")]
        return loaded

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        for meta in (self.offs, self.present, self.rank, self.act):
            meta.reset(slot)
        super().unload(slot, loaded)

    def prepare(self, batch: Any, segs: torch.Tensor) -> AdapterPlan:
        dev, h = self.ctx.device, self.ctx.spec.hidden
        tasks = batch.seg_task_cpu[segs]
        present, rank, act = self.present[tasks], self.rank[tasks], self.act[tasks]
        sites: dict[str, list[_Group]] = {}
        for si, s in enumerate(ADAPTER_SITES):
            groups = []
            for a in torch.unique(act[present[:, si]]).tolist():  # distinct activations only
                sel = present[:, si] & (act == a)
                n = int(sel.sum())

                def d(t: torch.Tensor) -> torch.Tensor:
                    return t.contiguous().to(dev, non_blocking=True)

                groups.append(
                    _Group(
                        seg=d(segs[sel].to(torch.int32)),
                        offs=d(self.offs[tasks[sel]][:, si].permute(1, 2, 0)),
                        rank=d(rank[sel]),
                        act=int(a),
                        max_rank=int(rank[sel].max()),
                        zeros=d(torch.zeros(n, dtype=torch.int32)),
                        out_dim=d(torch.full((n,), h, dtype=torch.int32)),
                        ones=d(torch.ones(n, dtype=torch.float32)),
                    )
                )
            if groups:
                sites[s] = groups
        return AdapterPlan(seg_indptr=batch.seg_indptr, sites=sites)

    def apply_output(self, plan: AdapterPlan, site: str, layer: int, h: torch.Tensor) -> None:
        K = self.ctx.ops
        for g in plan.sites.get(site, ()):
            o = g.offs[:, layer]
            tmp = K.sgmv_shrink(
                h,
                self.pool.data,
                plan.seg_indptr,
                g.seg,
                o[0],
                g.rank,
                self.pool.data,
                o[1],
                g.act,
                g.max_rank,
            )
            K.sgmv_expand(
                h,
                tmp,
                self.pool.data,
                plan.seg_indptr,
                g.seg,
                o[2],
                g.rank,
                g.zeros,
                g.zeros,
                g.out_dim,
                g.ones,
                self.pool.data,
                o[3],
            )
