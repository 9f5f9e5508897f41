"""Bottleneck adapters (Houlsby; Pfeiffer when only the FFN site is adapted).

After the attention-output and FFN-output dense layers (bias included: the exact method,
unlike PetS which dropped the dense bias), ``h = h + up(act(down(h)))``, then the residual
LayerNorm with the task's gamma/beta. Tasks of different bottlenecks and activations share
one ``adapter_residual_layernorm`` launch per site: bias, adapter, residual and LayerNorm in
one op. Where the site has other output transforms too (IA3) or shadow ops run over streams,
the unfused path runs instead: bias, then one grouped down and one grouped up launch per
distinct activation in the batch, then the residual LayerNorm.

Hyper-parameters: ``activation`` (``relu`` | ``gelu`` | ``silu`` | ``gelu_new``; default
``relu``). Tensors, for site module ``attention.output`` and/or ``output`` (the same sites
at every layer):
    ``encoder.layer.{i}.{site}.adapter.down.weight`` ``[r, H]``, ``...down.bias`` ``[r]``,
    ``encoder.layer.{i}.{site}.adapter.up.weight`` ``[H, r]``, ``...up.bias`` ``[H]``,
plus any BitFit-style LayerNorm / bias tensors (Houlsby trains the LayerNorms).
:meth:`Adapter.generate` also takes ``bottleneck`` (default 64), the rank of a random task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from petops.reference import ACTIVATIONS

from ..backbone import BackboneWeights
from ..batch import Batch
from ..errors import TaskError
from ..graphs import HOST_ONLY
from .base import (
    CostDims,
    LoadedTask,
    OutputEpilogue,
    PetConfig,
    PetContext,
    PetCost,
    PetMethod,
    register_pet,
)
from .common import (
    alloc_bias_ln,
    bias_names,
    check_bias_ln,
    check_known,
    check_same_sites,
    check_tensor,
    layer_key,
    ln_names,
    random_bias_ln,
)
from .meta import SlotMeta

ADAPTER_SITES = {"attn_out": "attention.output", "ffn_out": "output"}
SITE_INDEX = {s: i for i, s in enumerate(ADAPTER_SITES)}
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
COST_RANK = 64  # a typical bottleneck, for the cost model


@dataclass(frozen=True)
class AdapterConfig(PetConfig):
    """An adapter task's hyper-parameters; the bottleneck comes from the tensors."""

    activation: str = "relu"  # Houlsby's ReLU unless the task says otherwise

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> AdapterConfig:
        act = hparams.get("activation", "relu")
        if not isinstance(act, str) or act not in ACTIVATIONS or act == "none":
            raise TaskError(
                f"adapter activation {act!r} is not supported; use one of "
                f"{sorted(set(ACTIVATIONS) - {'none'})}"
            )
        return cls(activation=act)


@dataclass
class _Group:
    """One activation's grouped shrink/expand items at one site (the unfused path).

    ``I`` items, one per segment whose task has an adapter at the site with this activation.
    """

    act: int  # ACT_* code
    max_rank: int
    seg: torch.Tensor  # [I] int32
    rank: torch.Tensor  # [I] int32
    zeros: torch.Tensor  # [I] int32
    out_dim: torch.Tensor  # [I] int32, all H
    ones: torch.Tensor  # [I] float32
    offs: torch.Tensor  # [L, 4, I] int64: down.w, down.b, up.w, up.b


@dataclass
class _HostTables:
    """The adapter segments' metadata on the host (``Sm`` segments, ``A`` sites, ``L`` layers),
    kept for the unfused path's groups."""

    segs: torch.Tensor  # [Sm] int64 segment indices
    present: torch.Tensor  # [A, Sm] bool
    rank: torch.Tensor  # [A, Sm] int32 (0 where absent)
    act: torch.Tensor  # [Sm] int32
    offs: torch.Tensor  # [A, L, Sm, 4] int64


@dataclass
class AdapterPlan:
    """One batch's adapter metadata on the device (``A`` sites, ``L`` layers, ``S`` segments).

    The fused op (:meth:`Adapter.fused_output`) reads the per-segment tables, indexed over
    all ``S`` segments of the batch (rank 0 where a segment is no adapter task or its task
    has no adapter at the site). The unfused path (:meth:`Adapter.apply_output`:
    SHADOW_STREAMS mode, or another output transform in the batch) reads ``groups``, built
    from ``host`` while the batch is planned (:meth:`Adapter.prepare_unfused`).
    """

    seg_indptr: torch.Tensor  # [S + 1] int32
    seg_rank: torch.Tensor  # [A, S] int32 bottleneck per site
    seg_act: torch.Tensor  # [S] int32 ACT_* code (ACT_NONE where no adapter)
    seg_w_off: torch.Tensor  # [A, L, S, 4] int64 pool offsets (0 where the rank is 0)
    max_rank: list[int]  # [A] host: max of seg_rank per site
    # Read only while planning (the unfused path's groups); not by the forward's kernels.
    host: _HostTables = field(metadata={HOST_ONLY: True})
    groups: dict[str, list[_Group]] | None = None  # site -> one group per distinct activation


def _to_device(parts: list[torch.Tensor], ctx: PetContext) -> list[torch.Tensor]:
    """Host tensors of one dtype on the device in one transfer (staged while a batch is being
    prepared, see :meth:`PetContext.to_device`); returns views of their shapes."""
    flat = ctx.to_device(torch.cat([p.reshape(-1) for p in parts]))
    views = flat.split([p.numel() for p in parts])
    return [v.view(p.shape) for v, p in zip(views, parts, strict=True)]


@register_pet
class Adapter(PetMethod):
    name = "adapter"
    code = 4
    has_output_transform = True
    Config = AdapterConfig
    default_options: ClassVar[dict[str, Any]] = {"bottleneck": 64, "activation": "relu"}
    demo_options: ClassVar[dict[str, Any] | None] = {"bottleneck": 16}

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Houlsby adapters (both sites, rank ``bottleneck``, ``N(0, 0.05)`` weights) and
        noisy layer LayerNorms."""
        g = torch.Generator().manual_seed(seed)
        spec = weights.spec
        r, h = int(options.get("bottleneck", 64)), spec.hidden
        t = {}
        for i in range(spec.layers):
            for module in ADAPTER_SITES.values():
                for part, shape in zip(PARTS, ((r, h), (r,), (h, r), (h,)), strict=True):
                    t[layer_key(i, module, f"adapter.{part}")] = (
                        torch.randn(*shape, generator=g) * 0.05
                    )
        t.update(random_bias_ln(weights, g, 0.05, emb_ln=False, biases=False))
        return {"activation": options.get("activation", "relu")}, t

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        """``8·H·r`` FLOPs (down and up at two sites, r = 64) at small-GEMM efficiency."""
        return PetCost(flops=8.0 * dims.hidden * COST_RANK / dims.small_gemm_efficiency)

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
        self.Config.from_hparams(hparams)
        spec = self.ctx.spec
        names = {
            self._key(i, s, p) for i in range(spec.layers) for s in ADAPTER_SITES for p in PARTS
        }
        check_known(tensors, names | set(bias_names(spec)) | set(ln_names(spec)), self.name)
        check_bias_ln(spec, tensors)
        sites = check_same_sites(tensors, spec.layers, ADAPTER_SITES, PARTS, self._key, self.name)
        r = tensors[self._key(0, sites[0], "down.weight")].shape[0]
        h = spec.hidden
        for i in range(spec.layers):
            for s in sites:
                for p, shape in zip(PARTS, ((r, h), (r,), (h, r), (h,)), strict=True):
                    check_tensor(self._key(i, s, p), tensors[self._key(i, s, p)], shape)

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
        self.act[slot] = ACTIVATIONS[AdapterConfig.from_hparams(hparams).activation]
        return loaded

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        for meta in (self.offs, self.present, self.rank, self.act):
            meta.reset(slot)
        super().unload(slot, loaded)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> AdapterPlan:
        """The fused path's per-segment tables for the adapter segments ``segs`` (host int64
        ``[Sm]``): vectorised over segments on the host, staged for the forward's one copy."""
        spec = self.ctx.spec
        n_sites, n_seg = len(ADAPTER_SITES), batch.num_segments
        seg = segs.numpy()
        tasks = batch.seg_task_cpu.numpy()[seg]  # [Sm]; numpy: small-array ops cost less
        present_np = self.present.rows(tasks).T  # [A, Sm]
        rank_np = np.where(present_np, self.rank.rows(tasks), 0).astype(np.int32)  # [A, Sm]
        act_np = self.act.rows(tasks)  # [Sm] int32
        offs_np = self.offs.rows(tasks).transpose(1, 3, 0, 2)  # [A, L, Sm, 4]
        seg_rank = np.zeros((n_sites, n_seg), dtype=np.int32)
        seg_rank[:, seg] = rank_np
        seg_act = np.zeros(n_seg, dtype=np.int32)
        seg_act[seg] = act_np
        seg_w_off = np.zeros((n_sites, spec.layers, n_seg, 4), dtype=np.int64)
        seg_w_off[:, :, seg] = np.where(present_np[:, None, :, None], offs_np, 0)
        present, rank = torch.from_numpy(present_np), torch.from_numpy(rank_np)
        act, offs = torch.from_numpy(act_np), torch.from_numpy(offs_np)
        up = self.ctx.to_device
        return AdapterPlan(
            seg_indptr=batch.seg_indptr,
            seg_rank=up(torch.from_numpy(seg_rank)),
            seg_act=up(torch.from_numpy(seg_act)),
            seg_w_off=up(torch.from_numpy(seg_w_off)),
            max_rank=rank_np.max(1).tolist(),
            host=_HostTables(segs=segs, present=present, rank=rank, act=act, offs=offs),
        )

    def _groups(self, plan: AdapterPlan) -> dict[str, list[_Group]]:
        """The unfused path's items: per site, the adapter segments sorted by activation, one
        group per distinct activation (a loop over activation kinds, not tasks). Built on
        first use and kept in the plan; two host-to-device copies (int32, int64)."""
        if plan.groups is not None:
            return plan.groups
        t, h = plan.host, self.ctx.spec.hidden
        i32: list[torch.Tensor] = []
        i64: list[torch.Tensor] = []
        bounds: dict[str, tuple[list[int], list[int], list[int]]] = {}
        for si, site in enumerate(ADAPTER_SITES):
            items = torch.nonzero(t.present[si]).flatten()
            if not items.numel():
                continue
            items = items[torch.argsort(t.act[items], stable=True)]
            acts, gid, counts = torch.unique_consecutive(
                t.act[items], return_inverse=True, return_counts=True
            )
            r = t.rank[si, items]
            gmax = torch.zeros(acts.numel(), dtype=torch.int32).scatter_reduce(0, gid, r, "amax")
            n = items.numel()
            i32 += [
                t.segs[items].to(torch.int32),
                r,
                torch.zeros(n, dtype=torch.int32),
                torch.full((n,), h, dtype=torch.int32),
            ]
            i64.append(t.offs[si][:, items].permute(0, 2, 1))  # [L, 4, I]
            bounds[site] = (acts.tolist(), torch.cumsum(counts, 0).tolist(), gmax.tolist())
        plan.groups = {}
        if not bounds:
            return plan.groups
        n_max = max(e[-1] for _, e, _ in bounds.values())
        d32, d64 = _to_device(i32, self.ctx), _to_device(i64, self.ctx)
        ones = self.ctx.to_device(torch.ones(n_max, dtype=torch.float32))
        for k, (site, (gacts, ends, gmaxs)) in enumerate(bounds.items()):
            seg, r_d, zeros, out_dim = d32[4 * k : 4 * k + 4]
            plan.groups[site] = [
                _Group(
                    act=a,
                    max_rank=m,
                    seg=seg[lo:hi],
                    rank=r_d[lo:hi],
                    zeros=zeros[lo:hi],
                    out_dim=out_dim[lo:hi],
                    ones=ones[lo:hi],
                    offs=d64[k][:, :, lo:hi],
                )
                for a, lo, hi, m in zip(gacts, [0, *ends[:-1]], ends, gmaxs, strict=True)
            ]
        return plan.groups

    def fused_output(
        self, plan: AdapterPlan, site: str, layer: int, ep: OutputEpilogue
    ) -> torch.Tensor | None:
        """Bias, every segment's adapter and the residual LayerNorm of ``site``: one op.

        A site without adapters in the batch (Pfeiffer's attention output) gets the plain
        LayerNorm epilogue. Returns ``[T, H]`` (None for a site adapters never sit at).
        """
        K, si = self.ctx.ops, SITE_INDEX.get(site)
        if si is None:
            return None
        if plan.max_rank[si] == 0:
            return ep.layernorm(K)
        return K.adapter_residual_layernorm(
            ep.y,
            ep.residual,
            ep.bias,
            ep.seg_bias,
            self.pool.data,
            plan.seg_w_off[si, layer],
            plan.seg_rank[si],
            plan.seg_act,
            ep.gamma,
            ep.beta,
            ep.seg_indptr,
            ep.seg_ln,
            plan.max_rank[si],
            ep.eps,
        )

    def prepare_unfused(self, plan: AdapterPlan) -> None:
        self._groups(plan)

    def apply_output(self, plan: AdapterPlan, site: str, layer: int, h: torch.Tensor) -> None:
        K = self.ctx.ops
        for g in self._groups(plan).get(site, ()):
            o = g.offs[layer]  # [4, I]
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
