"""IA3: learned per-channel scaling vectors (PEFT ``IA3Config`` semantics for BERT).

PEFT multiplies a target Linear's *output* (bias included) by ``ia3_l``, or, for a
*feedforward* module, its *input*. On BERT that maps onto the engine as follows (``H``
hidden, ``F`` FFN width; tensors are flat, PEFT's ``[out, 1]`` / ``[1, in]`` squeezed):

===============================  ==========  =====  ==========================================
module (``encoder.layer.{i}.``)   feedforward shape  where the engine applies it
===============================  ==========  =====  ==========================================
attention.self.{query,key,value}  no         [H]    IA3 scale row ``qkv`` (after the bias)
attention.output.dense            yes        [H]    folded into the ``value`` block of ``qkv``
                                                    (attention mixes tokens, never channels, so
                                                    scaling its output per channel = scaling V)
output.dense                      yes        [F]    IA3 scale row ``ffn_in`` (after GELU)
attention.output.dense            no         [H]    output transform after the bias, before
output.dense                      no         [H]    the residual + LayerNorm
intermediate.dense                either     -      refused: its scale would sit before GELU
                                                    (or on the FFN input), not representable
query/key/value                   yes        -      refused (would scale the shared QKV input)
===============================  ==========  =====  ==========================================

PEFT's BERT default (``target_modules=["key", "value", "output.dense"]``,
``feedforward_modules=["output.dense"]``, suffix matching) adapts ``key``, ``value`` and both
``attention.output.dense`` and ``output.dense`` as feedforward modules.

Hyper-parameters (:class:`Ia3Config`): ``feedforward_modules``: list of full module names
(aliases as in :data:`MODULE_ALIASES`) whose *input* is scaled; default
``["attention.output.dense", "output.dense"]``. ``target_modules`` is informational.
:meth:`Ia3.generate` reads ``target_modules`` / ``feedforward_modules`` the PEFT way
(:func:`peft_match`: suffixes or a regex; PEFT's BERT defaults).
Tensors: ``encoder.layer.{i}.{module}.ia3_l`` as in the table; any subset of layers and
modules (missing ones scale by 1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backbone import BackboneWeights
from ..errors import TaskError
from .base import CostDims, LoadedTask, PetConfig, PetCost, PetMethod, register_pet
from .common import MODULE_ALIASES, MODULES, check_known, check_tensor, layer_key, module_list
from .meta import SlotMeta

KEY = "ia3_l"
DEFAULT_FEEDFORWARD = ("attention.output.dense", "output.dense")
QKV_BLOCK = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}
OUT_SITES = {"attn_out": "attention.output.dense", "ffn_out": "output.dense"}  # non-ff outputs


@dataclass
class Ia3Plan:
    """Per-batch output scales of the segments that scale an output site (non-feedforward
    ``attention.output.dense`` / ``output.dense``). Only those segments' token rows are
    touched, so the plan may run beside other types' shadow ops on other streams."""

    tokens: torch.Tensor  # [Ti] int64, device: token rows of those segments
    rows: torch.Tensor  # [Ti] int64, device: each token's row in ``tables``
    tables: dict[str, torch.Tensor]  # site -> [L, U, H] scales (ones where a task has none)


@dataclass(frozen=True)
class Ia3Config(PetConfig):
    """An IA3 task's hyper-parameters: which scaled modules scale their input."""

    # full module names; the default is PEFT's BERT default resolved by suffix
    feedforward_modules: tuple[str, ...] = DEFAULT_FEEDFORWARD

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> Ia3Config:
        """Full module names of ``feedforward_modules`` (aliases resolved, order kept)."""
        out: list[str] = []
        for name in module_list(hparams, "feedforward_modules", "ia3", DEFAULT_FEEDFORWARD):
            full = MODULE_ALIASES.get(name, name)
            if full not in MODULES:
                raise TaskError(
                    f"ia3 feedforward module {name!r} is not a BERT linear module; use "
                    f"full names from {sorted(MODULES)}"
                )
            if full not in out:
                out.append(full)
        return cls(feedforward_modules=tuple(out))


def peft_match(targets: list[str] | str) -> list[str]:
    """BERT modules PEFT selects for ``targets`` (a list: exact or ``.``-suffix match; a str:
    regex full match of ``encoder.layer.0.<module>``), e.g. ``"output.dense"`` ->
    attention.output.dense and output.dense."""
    if isinstance(targets, str):
        return [m for m in MODULES if re.fullmatch(targets, layer_key(0, m, "")[:-1])]
    return [m for m in MODULES if any(m == t or m.endswith("." + t) for t in targets)]


@register_pet
class Ia3(PetMethod):
    name = "ia3"
    code = 6
    Config = Ia3Config
    peft_type = "IA3"
    peft_marker = "ia3_l"
    peft_suffixes = (KEY,)
    default_options: ClassVar[dict[str, Any]] = {"target_modules": ["key", "value", "output.dense"]}

    @classmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Scales ``1 ± 0.3`` (uniform) on PEFT-matched ``target_modules`` at every layer;
        the manifest names the matched modules exactly."""
        g = torch.Generator().manual_seed(seed)
        spec = weights.spec
        ff = set(peft_match(options.get("feedforward_modules", ["output.dense"])))
        targets = peft_match(options.get("target_modules", ["key", "value", "output.dense"]))
        t = {}
        for m in targets:
            width = spec.ffn if (m == "output.dense" and m in ff) else spec.hidden
            for i in range(spec.layers):
                t[layer_key(i, m, KEY)] = 1 + (torch.rand(width, generator=g) * 2 - 1) * 0.3
        hparams = {
            "target_modules": targets,
            "feedforward_modules": [m for m in targets if m in ff],
        }
        return hparams, t

    @classmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        """No FLOPs; ``2H + F`` more epilogue elements (the q/k/v and FFN scale rows)."""
        return PetCost(epilogue_elements=2.0 * dims.hidden + dims.ffn)

    @classmethod
    def peft_hparams(
        cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor], modules: list[str]
    ) -> dict[str, Any]:
        """PEFT's ``[out, 1]`` (output) / ``[1, in]`` (feedforward) vectors flattened; the
        feedforward modules are those stored as ``[1, in]``."""
        ff = set()
        for k, t in list(tensors.items()):
            if not k.endswith("." + KEY):
                continue
            module = k.split(".", 3)[3].removesuffix("." + KEY)
            if t.dim() != 2 or 1 not in t.shape:
                raise TaskError(
                    f"IA3 tensor {k!r} has shape {tuple(t.shape)}; PEFT stores [out, 1] "
                    "(output scaling) or [1, in] (feedforward) vectors"
                )
            if t.shape[0] == 1 and t.shape[1] != 1:
                ff.add(module)
            tensors[k] = t.reshape(-1)
        return {"target_modules": modules, "feedforward_modules": sorted(ff)}

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.pool = ctx.pool()
        self.out_off = SlotMeta((len(OUT_SITES),), torch.int64, -1)  # [L, H] blob per site
        self._out_tasks = 0
        self.has_output_transform = False  # type: ignore[misc]  # on while any task needs it

    def _shape(self, module: str, ff: bool) -> tuple[int, ...]:
        spec = self.ctx.spec
        if module == "intermediate.dense":
            raise TaskError(
                "ia3 on 'intermediate.dense' is not supported: its scale would act "
                "before the GELU (or on the FFN input), which the fused epilogue "
                "cannot express; target 'output.dense' as a feedforward module "
                "instead (PEFT's BERT default)"
            )
        if ff and module in QKV_BLOCK:
            raise TaskError(
                f"ia3 feedforward scaling of {module!r} would scale the shared input "
                "of the fused QKV GEMM and is not supported; make it a "
                "non-feedforward target (output scaling, PEFT's default)"
            )
        if ff and module == "output.dense":
            return (spec.ffn,)
        return (spec.hidden,)

    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        ff = Ia3Config.from_hparams(hparams).feedforward_modules
        names = {layer_key(i, m, KEY): m for i in range(self.ctx.spec.layers) for m in MODULES}
        check_known(tensors, set(names), self.name)
        if not tensors:
            raise TaskError("ia3 task carries no ia3_l tensor; it would equal the backbone")
        for name, t in tensors.items():
            module = names[name]
            check_tensor(name, t, self._shape(module, module in ff))

    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        spec, ctx = self.ctx.spec, self.ctx
        ff = Ia3Config.from_hparams(hparams).feedforward_modules
        h = spec.hidden
        qkv = torch.ones(spec.layers, 3 * h)
        ffn = torch.ones(spec.layers, spec.ffn)
        outs = {s: torch.ones(spec.layers, h) for s in OUT_SITES}
        used_out = set()
        for i in range(spec.layers):
            for module in MODULES:
                t = tensors.get(layer_key(i, module, KEY))
                if t is None:
                    continue
                t = t.float()
                if module in QKV_BLOCK:
                    b = QKV_BLOCK[module]
                    qkv[i, b * h : (b + 1) * h] *= t
                elif module == "attention.output.dense" and module in ff:
                    qkv[i, 2 * h :] *= t  # scale(A) per channel == A computed from scaled V
                elif module == "output.dense" and module in ff:
                    ffn[i] *= t
                else:
                    site = next(s for s, m in OUT_SITES.items() if m == module)
                    outs[site][i] = t
                    used_out.add(site)
        loaded = LoadedTask()
        loaded.scale_slot = ctx.scale.alloc({"qkv": qkv, "ffn_in": ffn})
        off = torch.full((len(OUT_SITES),), -1, dtype=torch.int64)
        for si, site in enumerate(OUT_SITES):
            if site in used_out:
                alloc = self.pool.put(outs[site])
                loaded.allocations.append((self.pool, alloc))
                off[si] = alloc.offset
        self.out_off[slot] = off
        loaded.state = bool(used_out)
        if used_out:
            self._out_tasks += 1
            self.has_output_transform = True  # type: ignore[misc]
        return loaded

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        self.out_off.reset(slot)
        if loaded.state:
            self._out_tasks -= 1
            self.has_output_transform = self._out_tasks > 0  # type: ignore[misc]
        super().unload(slot, loaded)

    def prepare(self, batch: Any, segs: torch.Tensor) -> Ia3Plan | None:
        if not self._out_tasks:
            return None
        off = self.out_off[batch.seg_task_cpu[segs]]  # [Sm, 2]
        has = (off >= 0).any(1)
        if not bool(has.any()):
            return None
        spec, dev = self.ctx.spec, self.ctx.device
        L, h = spec.layers, spec.hidden
        sel, off = segs[has], off[has]  # U segments
        indptr = batch.seg_indptr_cpu.long()
        starts, lengths = indptr[sel], indptr[sel + 1] - indptr[sel]
        seg_of_tok = torch.repeat_interleave(torch.arange(sel.numel()), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        tokens = starts[seg_of_tok] + torch.arange(seg_of_tok.numel()) - first[seg_of_tok]
        span = torch.arange(L * h, device=dev)
        tables = {}
        for si, site in enumerate(OUT_SITES):
            o = off[:, si]
            own = torch.nonzero(o >= 0).flatten()
            if not own.numel():
                continue
            rows = torch.ones(sel.numel(), L * h, device=dev, dtype=self.ctx.dtype)
            # one gather of the needed [L, H] blobs, no per-task loop
            rows[own.to(dev)] = self.pool.data[o[own].to(dev)[:, None] + span[None, :]]
            tables[site] = rows.view(-1, L, h).transpose(0, 1).contiguous()
        return Ia3Plan(
            tokens=self.ctx.to_device(tokens),
            rows=self.ctx.to_device(seg_of_tok),
            tables=tables,
        )

    def apply_output(self, plan: Ia3Plan | None, site: str, layer: int, h: torch.Tensor) -> None:
        if plan is None or site not in plan.tables:
            return
        scaled = h.index_select(0, plan.tokens) * plan.tables[site][layer].index_select(
            0, plan.rows
        )
        h.index_copy_(0, plan.tokens, scaled)
