"""LoRA: ``Y_t += s * (X_t @ A_t.T) @ B_t.T`` on any subset of q/k/v/attention-out/FFN.

Any rank; tasks of different ranks and module sets share one grouped shrink and one grouped
expand launch per site. On the fused QKV site, one shrink item per task multiplies the
stacked ``[A_q; A_k; A_v]`` and three expand items write the q, k and v column blocks.

Hyper-parameters: ``r`` (int), ``lora_alpha`` (default ``r``), ``use_rslora`` (default
false); scale ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), as in PEFT.
Tensors (PEFT layout; the same modules at every layer):
    ``encoder.layer.{i}.{module}.lora_A.weight`` ``[r, in]``,
    ``encoder.layer.{i}.{module}.lora_B.weight`` ``[out, r]``.
``target_modules`` in a manifest is informational (the tensors say which modules); for
:meth:`Lora.generate` it picks the modules (keys of :data:`TARGETS`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..backbone import SITES, BackboneWeights
from ..errors import TaskError
from .base import CostDims, LoadedTask, PetConfig, PetCost, PetMethod, register_pet
from .common import (
    MODULES,
    check_known,
    check_same_sites,
    check_tensor,
    finite_float,
    flag,
    layer_key,
    module_shape,
    positive_int,
)
from .meta import SlotMeta

MOD_LIST = list(MODULES)
A, B = "lora_A.weight", "lora_B.weight"
COST_RANK = 16  # a typical rank, for the cost model
# generate()'s target_modules spellings (PEFT style) -> BERT module
TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
    "dense": "attention.output.dense",
}


# PEFT LoraConfig fields that change the math in ways the engine does not implement.
PEFT_UNSUPPORTED = {
    "use_dora": "DoRA adds a per-column magnitude re-normalisation the LoRA kernels do not do; "
    "merge the adapter into a full checkpoint and use `pets import-finetuned`",
    "layers_to_transform": "LoRA on only some layers: every layer must adapt the same modules",
    "layer_replication": "layer replication changes the backbone's depth",
    "use_qalora": "QA-LoRA pools the input, which the LoRA kernels do not do",
    "lora_bias": "lora_bias adds a bias to lora_B, which the LoRA kernels do not do",
    "alora_invocation_tokens": "activated LoRA switches per token",
    "target_parameters": "LoRA on raw parameters (not Linear modules)",
    "trainable_token_indices": "trained embedding rows would change the shared embeddings",
    "fan_in_fan_out": "fan_in_fan_out layouts are for GPT-2 Conv1D, not BERT Linear",
}


@dataclass(frozen=True)
class LoraConfig(PetConfig):
    """A LoRA task's hyper-parameters (PEFT's ``LoraConfig`` fields of the same names)."""

    r: int  # the rank; the tensors must agree
    lora_alpha: float  # defaults to r (scale 1), as in PEFT
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (PEFT's use_rslora)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> LoraConfig:
        r = positive_int(hparams, "r", "lora")
        return cls(
            r=r,
            lora_alpha=finite_float(hparams, "lora_alpha", "lora", r),
            use_rslora=flag(hparams, "use_rslora", "lora"),
        )

    @property
    def scale(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class _SitePlan:
    s_seg: torch.Tensor  # [I] int32
    s_w_off: torch.Tensor  # [L, I] int64
    s_rank: torch.Tensor  # [I] int32
    max_rank: int
    e_seg: torch.Tensor  # [J] int32
    e_w_off: torch.Tensor  # [L, J] int64
    e_rank: torch.Tensor  # [J] int32
    e_in_off: torch.Tensor  # [J] int32
    e_out_off: torch.Tensor  # [J] int32
    e_out_dim: torch.Tensor  # [J] int32
    e_scale: torch.Tensor  # [J] float32


@dataclass
class LoraPlan:
    seg_indptr: torch.Tensor
    sites: dict[str, _SitePlan]


@register_pet
class Lora(PetMethod):
    name = "lora"
    code = 5
    Config = LoraConfig
    peft_type = "LORA"
    peft_marker = "lora_"
    peft_suffixes = (A, B)
    default_options: ClassVar[dict[str, Any]] = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["query", "value"],
    }
    demo_options: ClassVar[dict[str, Any] | None] = {}

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Rank-``r`` A and B (``N(0, 0.1)``) on ``target_modules`` at every layer."""
        g = torch.Generator().manual_seed(seed)
        spec = weights.spec
        r = int(options["r"])
        t = {}
        for target in options.get("target_modules", ["query", "value"]):
            m = TARGETS[target]
            out, inp = module_shape(spec, m)
            for i in range(spec.layers):
                t[layer_key(i, m, A)] = torch.randn(r, inp, generator=g) * 0.1
                t[layer_key(i, m, B)] = torch.randn(out, r, generator=g) * 0.1
        hparams = {
            "r": options["r"],
            "lora_alpha": options.get("lora_alpha", options["r"]),
            "target_modules": list(options.get("target_modules", [])),
        }
        return hparams, t

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        """``2·r·(8H + 2F)`` FLOPs (all four sites, r = 16) at small-GEMM efficiency."""
        h, f = dims.hidden, dims.ffn
        return PetCost(flops=2.0 * COST_RANK * (8.0 * h + 2.0 * f) / dims.small_gemm_efficiency)

    @classmethod
    def check_peft_config(cls, cfg: Mapping[str, Any]) -> None:
        """One rank and one alpha for the whole task, no bias training, no DoRA & co."""
        for key, why in PEFT_UNSUPPORTED.items():
            if cfg.get(key) not in (None, False, [], {}, ""):
                raise TaskError(f"adapter_config {key}={cfg[key]!r} is not supported: {why}")
        if cfg.get("bias", "none") != "none":
            raise TaskError(
                f"adapter_config bias={cfg['bias']!r}: the adapter trained the "
                "backbone's biases too, which a LoRA task cannot carry; retrain with "
                "bias='none', or merge and use `pets import-finetuned --as diff_pruning`"
            )
        r = cfg.get("r")
        alpha = cfg.get("lora_alpha", r)
        if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
            raise TaskError(
                f"adapter_config needs integer r >= 1 and numeric lora_alpha, got "
                f"r={r!r}, lora_alpha={alpha!r}"
            )
        for key, base in (("rank_pattern", r), ("alpha_pattern", alpha)):
            pattern = cfg.get(key) or {}
            odd = {k: v for k, v in pattern.items() if v != base}
            if odd:
                raise TaskError(
                    f"adapter_config {key} {odd} gives some modules a different "
                    f"{'rank' if key == 'rank_pattern' else 'alpha'} than {base}; a "
                    "LoRA task has one rank and one alpha. Import per-module variants "
                    "as separate tasks, or merge and use `pets import-finetuned`"
                )

    @classmethod
    def peft_hparams(
        cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor], modules: list[str]
    ) -> dict[str, Any]:
        r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        for k, t in tensors.items():
            if k.endswith(A) and t.shape[0] != r:
                raise TaskError(f"{k!r} has rank {t.shape[0]} but adapter_config r={r}")
        targets = sorted(
            {k.split(".", 3)[3].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k}
        )
        return {
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "target_modules": targets,
        }

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        L = ctx.spec.layers
        self.pool = ctx.pool()
        self.a_off = SlotMeta((L, len(SITES)), torch.int64, -1)
        self.b_off = SlotMeta((L, len(MOD_LIST)), torch.int64, -1)
        self.nmods = SlotMeta((len(SITES),), torch.int32, 0)
        self.in_off = SlotMeta((len(MOD_LIST),), torch.int32, -1)
        self.rank = SlotMeta((), torch.int32, 0)
        self.scale = SlotMeta((), torch.float32, 0.0)
        # per site: its modules (indices into MOD_LIST) and each one's output column block
        self._site_modules: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for site in SITES:
            mods = [mi for mi, m in enumerate(MOD_LIST) if MODULES[m][0] == site]
            width = ctx.spec.site_shape(site)[0] // (3 if site == "qkv" else 1)
            blocks = np.array([MODULES[MOD_LIST[mi]][1] for mi in mods], dtype=np.int64)
            self._site_modules.append(
                (np.array(mods, dtype=np.int64), blocks * width, np.full(len(mods), width))
            )

    def _modules(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        return [m for m in MOD_LIST if layer_key(0, m, A) in tensors]

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        spec = self.ctx.spec
        r = LoraConfig.from_hparams(hparams).r
        names = {layer_key(i, m, k) for i in range(spec.layers) for m in MOD_LIST for k in (A, B)}
        check_known(tensors, names, self.name)
        mods = check_same_sites(tensors, spec.layers, MOD_LIST, (A, B), layer_key, self.name)
        for i in range(spec.layers):
            for m in mods:
                out, inp = module_shape(spec, m)
                check_tensor(layer_key(i, m, A), tensors[layer_key(i, m, A)], (r, inp))
                check_tensor(layer_key(i, m, B), tensors[layer_key(i, m, B)], (out, r))

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        spec = self.ctx.spec
        cfg = LoraConfig.from_hparams(hparams)
        r, scale = cfg.r, cfg.scale
        mods = self._modules(tensors)
        loaded = LoadedTask()
        a_off = torch.full((spec.layers, len(SITES)), -1, dtype=torch.int64)
        b_off = torch.full((spec.layers, len(MOD_LIST)), -1, dtype=torch.int64)
        nmods = torch.zeros(len(SITES), dtype=torch.int32)
        in_off = torch.full((len(MOD_LIST),), -1, dtype=torch.int32)
        for si, site in enumerate(SITES):
            site_mods = [m for m in mods if MODULES[m][0] == site]
            nmods[si] = len(site_mods)
            for j, m in enumerate(site_mods):
                in_off[MOD_LIST.index(m)] = j * r
        for i in range(spec.layers):
            for si, site in enumerate(SITES):
                site_mods = [m for m in mods if MODULES[m][0] == site]
                if not site_mods:
                    continue
                stacked = torch.cat([tensors[layer_key(i, m, A)] for m in site_mods])
                alloc = self.pool.put(stacked)
                loaded.allocations.append((self.pool, alloc))
                a_off[i, si] = alloc.offset
            for m in mods:
                alloc = self.pool.put(tensors[layer_key(i, m, B)])
                loaded.allocations.append((self.pool, alloc))
                b_off[i, MOD_LIST.index(m)] = alloc.offset
        self.a_off[slot], self.b_off[slot], self.nmods[slot] = a_off, b_off, nmods
        self.in_off[slot], self.rank[slot], self.scale[slot] = in_off, r, scale
        return loaded

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        for meta in (self.a_off, self.b_off, self.nmods, self.in_off, self.rank, self.scale):
            meta.reset(slot)
        super().unload(slot, loaded)

    def prepare(self, batch: Any, segs: torch.Tensor) -> LoraPlan:
        """Per site: one shrink item per segment of a task that adapts a module there (its
        modules' A stacked, rank ``r * modules``) and one expand item per (segment, module),
        module-major. Built in numpy over the batch's LoRA segments at once."""
        seg = segs.numpy()
        tasks = batch.seg_task_cpu.numpy()[seg]
        rank, scale = self.rank.rows(tasks), self.scale.rows(tasks)
        in_off, nmods = self.in_off.rows(tasks), self.nmods.rows(tasks)
        a_off, b_off = self.a_off.rows(tasks), self.b_off.rows(tasks)  # [n, L, sites|mods]
        d = self._upload
        sites: dict[str, _SitePlan] = {}
        for si, site in enumerate(SITES):  # four sites: not a task loop
            has = nmods[:, si] > 0
            if not has.any():
                continue
            s_rank = (rank[has] * nmods[has, si]).astype(np.int32)
            mods, out_off, out_dim = self._site_modules[si]
            # (module, task) pairs present, module-major: the order the expand items take
            j, t = np.nonzero(in_off[:, mods].T >= 0)
            m = mods[j]
            sites[site] = _SitePlan(
                s_seg=d(seg[has], np.int32),
                s_w_off=d(a_off[has, :, si].T, np.int64),
                s_rank=d(s_rank, np.int32),
                max_rank=int(s_rank.max()),
                e_seg=d(seg[t], np.int32),
                e_w_off=d(b_off[t, :, m].T, np.int64),
                e_rank=d(rank[t], np.int32),
                e_in_off=d(in_off[t, m], np.int32),
                e_out_off=d(out_off[j], np.int32),
                e_out_dim=d(out_dim[j], np.int32),
                e_scale=d(scale[t], np.float32),
            )
        return LoraPlan(seg_indptr=batch.seg_indptr, sites=sites)

    def _upload(self, a: np.ndarray, dtype: type) -> torch.Tensor:
        return self.ctx.to_device(torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)))

    def linear_sites(self, plan: LoraPlan) -> Collection[str]:
        return plan.sites.keys()  # the sites where some task of the batch adapts a module

    def apply_linear(
        self, plan: LoraPlan, site: str, layer: int, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        sp = plan.sites.get(site)
        if sp is None:
            return
        K = self.ctx.ops
        tmp = K.sgmv_shrink(
            x,
            self.pool.data,
            plan.seg_indptr,
            sp.s_seg,
            sp.s_w_off[layer],
            sp.s_rank,
            None,
            None,
            0,
            sp.max_rank,
        )
        K.sgmv_expand(
            y,
            tmp,
            self.pool.data,
            plan.seg_indptr,
            sp.e_seg,
            sp.e_w_off[layer],
            sp.e_rank,
            sp.e_in_off,
            sp.e_out_off,
            sp.e_out_dim,
            sp.e_scale,
            None,
            None,
        )
