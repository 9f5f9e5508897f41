"""Diff-Pruning: a sparse weight delta per linear, plus task biases and LayerNorms.

``W_task = W + delta`` with ``delta`` sparse (typically 0.5-1% dense), so at each site
``Y_t = X_t @ W.T + X_t @ delta_t.T``: the shared GEMM plus one grouped ``seg_spmm``.

Tensors (all optional per module; a task needs at least one):
    ``encoder.layer.{i}.{module}.weight_delta_indices`` int32/int64 ``[nnz]``: flat positions
        ``o * in + k`` into the ``[out, in]`` weight, unique;
    ``encoder.layer.{i}.{module}.weight_delta_values`` float ``[nnz]``;
    plus any BitFit-style bias / LayerNorm tensors (full values, not deltas).
No hyper-parameters (an imported task's ``density`` is informational). :meth:`generate` takes
``density`` (default 0.01), the share of each weight matrix that a random task changes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any, ClassVar

import torch

from ..backbone import SITES, BackboneWeights
from ..batch import Batch
from ..errors import TaskError
from .base import CostDims, LoadedTask, PetContext, PetCost, PetMethod, register_pet
from .common import (
    MODULES,
    alloc_bias_ln,
    bias_names,
    check_bias_ln,
    check_known,
    layer_key,
    ln_names,
    module_shape,
    random_bias_ln,
)
from .sparse import SitePlan, SparseStore

IDX, VAL = "weight_delta_indices", "weight_delta_values"
COST_DENSITY = 0.01  # a typical task's share of changed weights, for the cost model


def check_flat_indices(name: str, idx: torch.Tensor, numel: int) -> None:
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise TaskError(
            f"tensor {name!r} must be 1-D int32/int64, got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise TaskError(
            f"tensor {name!r} has positions outside [0, {numel}); it was made for "
            "another backbone shape"
        )
    if is_increasing(idx):  # sorted and distinct: how tasks are written; no sort needed
        return
    if torch.unique(idx).numel() != idx.numel():
        raise TaskError(f"tensor {name!r} repeats positions; each weight may appear once")


def is_increasing(idx: torch.Tensor) -> bool:
    """Whether a 1-D tensor is strictly increasing (so sorted, with no repeats)."""
    return idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())


def sample_positions(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions of ``range(n)``, uniformly at random, sorted (int64 ``[k]``).

    Draws with replacement and drops repeats until ``k`` distinct remain, then keeps a
    uniform ``k`` of them: O(k log k) where ``torch.randperm(n)`` is O(n), which on a
    bert-base FFN weight (2.4 M positions, 1% kept) is about 40x the work."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} distinct positions of {n}; expected 0 <= k <= n")
    if 2 * k > n:  # dense: a permutation is as cheap and needs no retries
        return torch.randperm(n, generator=g)[:k].sort().values
    got = torch.empty(0, dtype=torch.int64)
    while got.numel() < k:
        extra = torch.randint(n, (k - got.numel() + k // 32 + 16,), generator=g)
        got = torch.unique(torch.cat([got, extra]))  # sorted
    if got.numel() > k:
        got = got[torch.randperm(got.numel(), generator=g)[:k]].sort().values
    return got


@register_pet
class DiffPruning(PetMethod):
    name = "diff_pruning"
    code = 2
    imports_finetuned = True
    default_options: ClassVar[dict[str, Any]] = {"density": 0.01}
    demo_options: ClassVar[dict[str, Any] | None] = {}

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Noisy biases/LayerNorms and, per linear, ``density`` of its weights moved by
        ``N(0, 0.05)``."""
        g = torch.Generator().manual_seed(seed)
        spec = weights.spec
        t = random_bias_ln(weights, g, 0.05)
        for i in range(spec.layers):
            for m in MODULES:
                out, inp = module_shape(spec, m)
                nnz = max(1, int(options.get("density", 0.01) * out * inp))
                idx = sample_positions(out * inp, nnz, g)
                t[layer_key(i, m, IDX)] = idx.to(torch.int32)
                t[layer_key(i, m, VAL)] = torch.randn(nnz, generator=g) * 0.05
        return {k: v for k, v in options.items() if k != "density"}, t

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        """``2·0.01·(4H² + 2HF)`` FLOPs (the changed 1%) at sparse efficiency."""
        return PetCost(flops=2.0 * COST_DENSITY * dims.linear_weights / dims.sparse_efficiency)

    def __init__(self, ctx: PetContext) -> None:
        super().__init__(ctx)
        self.store = SparseStore(ctx)

    def _names(self) -> dict[str, tuple[int, str, str]]:
        return {
            layer_key(i, m, kind): (i, m, kind)
            for i in range(self.ctx.spec.layers)
            for m in MODULES
            for kind in (IDX, VAL)
        }

    @classmethod
    def from_weight_deltas(
        cls, deltas: Iterable[tuple[int, str, torch.Tensor]], density: float
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
        """Per linear, the ``ceil(density * numel)`` largest ``|W_ft - W|`` (every change at
        density 1); exact zeros are not kept."""
        tensors = {}
        for i, module, delta in deltas:
            flat = delta.reshape(-1)
            keep = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
            if keep == flat.numel():  # keep every change (density 1.0)
                idx = torch.nonzero(flat).flatten()
            else:
                idx = torch.topk(flat.abs(), keep, sorted=False).indices
                idx = idx[flat[idx] != 0].sort().values
            if idx.numel():
                tensors[layer_key(i, module, IDX)] = idx.to(torch.int32)
                tensors[layer_key(i, module, VAL)] = flat[idx].clone()
        return {"density": density}, tensors, []

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.Config.from_hparams(hparams)
        spec = self.ctx.spec
        names = self._names()
        check_known(tensors, set(names) | set(bias_names(spec)) | set(ln_names(spec)), self.name)
        check_bias_ln(spec, tensors)
        for name, (i, module, kind) in names.items():
            if kind != IDX:
                continue
            vname = layer_key(i, module, VAL)
            if (name in tensors) != (vname in tensors):
                raise TaskError(f"{name!r} and {vname!r} must come together")
            if name not in tensors:
                continue
            out, inp = module_shape(spec, module)
            check_flat_indices(name, tensors[name], out * inp)
            vals = tensors[vname]
            if vals.shape != tensors[name].shape or not vals.is_floating_point():
                raise TaskError(
                    f"{vname!r} must be float with the shape of {name!r} "
                    f"{tuple(tensors[name].shape)}, got {vals.dtype} "
                    f"{tuple(vals.shape)}"
                )
            if not torch.isfinite(vals).all():
                raise TaskError(f"tensor {vname!r} contains NaN or Inf; re-export the task")
        if not tensors:
            raise TaskError("diff_pruning task carries no tensors; it would equal the backbone")

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        spec = self.ctx.spec
        loaded = LoadedTask()
        alloc_bias_ln(self.ctx, tensors, loaded)
        flat = {}
        for i in range(spec.layers):
            for module in MODULES:
                name = layer_key(i, module, IDX)
                if name in tensors:
                    pos, vals = tensors[name].long(), tensors[layer_key(i, module, VAL)]
                    flat[(i, module)] = (pos.to(self.ctx.device), vals.to(self.ctx.device))
        self.store.add(slot, loaded, self.store.matrices(flat))
        return loaded

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        self.store.remove(slot)
        super().unload(slot, loaded)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> SitePlan:
        return self.store.prepare(batch, segs)

    def apply_linear(
        self, plan: SitePlan, site: str, layer: int, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        self.store.apply(plan, site, layer, x, y)

    def linear_sites(self, plan: SitePlan) -> Collection[str]:
        return SITES  # a task may change any weight of any linear
