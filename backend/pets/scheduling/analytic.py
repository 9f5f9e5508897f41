"""Analytic cost model: the fallback used when no profiled table exists.

All costs are in seconds; ``b`` = batch size (queries), ``s`` = sequence length (tokens),
``T`` = total tokens of a packed batch. Backbone: ``H`` hidden, ``N`` layers, ``F`` FFN.

Shared ops (alpha), from the FLOPs of one encoder layer per token: the four linear sites
(QKV ``3H²``, attention-out ``H²``, FFN ``2HF``, 2 FLOPs per MAC) give ``8H² + 4HF``, and
attention (``QKᵀ`` and ``PV``) gives ``4sH``::

    alpha(b, s)      = c0 + b·s·N·(8H² + 4HF + 4sH) / R
                     = c0 + c1·b·s·(1 + s/L0),   c1 = N(8H² + 4HF)/R,  L0 = 2H + F
    alpha_packed(T)  = c0 + c1·T·(1 + s_ref/L0)          (s_ref: typical packed length)

with ``c0 = overhead_s`` (fixed per-forward cost: launches, host work) and ``R =
flops_per_s`` (effective dense throughput). PET ops (beta) of one task segment::

    beta(type, b, s) = c_seg + b·s·N·(E·e + W_type / (R·eff_type))

where ``c_seg = segment_overhead_s``, ``E = 5H + F`` elements of per-task epilogue (biases,
LayerNorm; every type pays it, as PetS moves bias/LN into the shadow op), ``e =
epilogue_s_per_element``, and ``W_type / eff_type`` (plus any extra epilogue elements) the
type's own term: :meth:`pets.pet.PetMethod.analytic_cost` in the type's module, which states
its formula (e.g. LoRA's ``2·r·(8H + 2F)`` at ``small_gemm_efficiency``).

The constants are rough per-device defaults (:meth:`AnalyticModel.for_device`); the
profiler calibrates them against measurements when it fills unmeasured table entries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pets.errors import ConfigError
from pets.pet import CostDims, pet_types

FArray = NDArray[np.float64]
# Fields that older cost tables carry in their "fallback" and that now live with the types.
_LEGACY_FIELDS = ("adapter_rank", "lora_rank")


@cache
def _type_terms(pet_type: str, dims: CostDims) -> tuple[float, float]:
    """(dense-equivalent FLOPs, extra epilogue elements) of ``pet_type``, from its module."""
    cls = pet_types().get(pet_type)
    if cls is None:
        raise ConfigError(
            f"the cost model has no PET type {pet_type!r}; known types are {list(pet_types())}"
        )
    cost = cls.analytic_cost(dims)
    return cost.flops, cost.epilogue_elements


@dataclass(frozen=True)
class AnalyticModel:
    """FLOP-derived alpha/beta model (see the module docstring for the formulas)."""

    hidden: int = 768
    layers: int = 12
    ffn: int = 3072
    flops_per_s: float = 1.0e14
    overhead_s: float = 1.0e-3
    segment_overhead_s: float = 5.0e-6
    epilogue_s_per_element: float = 4.0e-12
    sparse_efficiency: float = 0.125
    small_gemm_efficiency: float = 0.25
    packed_ref_len: float = 64.0
    alpha_scale: float = 1.0
    beta_scale: float = 1.0

    @classmethod
    def for_device(cls, device: str = "cuda", **backbone: Any) -> AnalyticModel:
        """Defaults for ``"cuda"`` (H100-class, fp16) or ``"cpu"`` (server CPU, fp32)."""
        if device.startswith("cuda") or device.startswith("gpu"):
            return cls(**backbone)
        return cls(
            flops_per_s=2.0e11,
            overhead_s=2.0e-4,
            segment_overhead_s=2.0e-5,
            epilogue_s_per_element=2.0e-10,
            **backbone,
        )

    @property
    def fingerprint(self) -> str:
        return f"analytic:h{self.hidden}-l{self.layers}-f{self.ffn}"

    def calibrated(self, alpha_scale: float, beta_scale: float) -> AnalyticModel:
        """A copy with alpha and beta multiplied by the given factors."""
        return replace(self, alpha_scale=alpha_scale, beta_scale=beta_scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalyticModel:
        """Inverse of :meth:`to_dict`; drops the per-type fields older tables carry
        (``adapter_rank``, ``lora_rank``: the types' modules now hold their typical ranks)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - set(_LEGACY_FIELDS))
        if unknown:  # ValueError: CostTable.load names the file
            raise ValueError(
                f"analytic model fields {unknown} are unknown; expected some of {sorted(known)}"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- per-token constants -------------------------------------------------------------
    @property
    def _dense_flops_per_token_layer(self) -> float:
        h, f = self.hidden, self.ffn
        return 8.0 * h * h + 4.0 * h * f

    def _pet_terms(self, pet_type: str) -> tuple[float, float]:
        """(extra FLOPs, epilogue elements) per token per layer for ``pet_type``."""
        h, f = float(self.hidden), float(self.ffn)
        dims = CostDims(h, f, self.sparse_efficiency, self.small_gemm_efficiency)
        flops, extra = _type_terms(pet_type, dims)
        return flops, 5.0 * h + f + extra

    # -- the CostModel interface (vectorised; returns float64 arrays) ------------------
    def alpha(self, batch: ArrayLike, seq_len: ArrayLike) -> FArray:
        """Shared-op seconds of ``batch`` queries padded to ``seq_len`` (broadcasts)."""
        b = np.asarray(batch, dtype=np.float64)
        s = np.asarray(seq_len, dtype=np.float64)
        per_tok = self._dense_flops_per_token_layer + 4.0 * s * self.hidden
        t = self.overhead_s + b * s * self.layers * per_tok / self.flops_per_s
        return np.asarray(t * self.alpha_scale, dtype=np.float64)

    def alpha_packed(self, total_tokens: ArrayLike) -> FArray:
        """Shared-op seconds of a packed batch of ``total_tokens`` tokens."""
        n = np.asarray(total_tokens, dtype=np.float64)
        per_tok = self._dense_flops_per_token_layer + 4.0 * self.packed_ref_len * self.hidden
        t = self.overhead_s + n * self.layers * per_tok / self.flops_per_s
        return np.asarray(t * self.alpha_scale, dtype=np.float64)

    def beta(self, pet_type: str, batch: ArrayLike, seq_len: ArrayLike) -> FArray:
        """PET-op seconds of one ``pet_type`` segment of ``batch`` queries at ``seq_len``."""
        b = np.asarray(batch, dtype=np.float64)
        s = np.asarray(seq_len, dtype=np.float64)
        flops, elems = self._pet_terms(pet_type)
        per_tok = elems * self.epilogue_s_per_element + flops / self.flops_per_s
        t = self.segment_overhead_s + b * s * self.layers * per_tok
        return np.asarray(t * self.beta_scale, dtype=np.float64)
