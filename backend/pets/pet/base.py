"""The one interface every PET type implements, plus the pieces they share.

A PET type turns a task's tensors (named as in the HF ``BertModel`` state dict, see the
README's task-store section) into rows of the pooled tables, and at serving time adds its
shadow work to the shared ops through grouped ``petops`` kernels:

* :meth:`PetMethod.load` / :meth:`PetMethod.unload`: place or free one task's weights;
* :meth:`PetMethod.prepare`: per batch, build the item arrays of this type's segments (host
  code, vectorised over segments: no per-task Python loop);
* :meth:`PetMethod.apply_linear`: add this type's delta to a shared GEMM output;
* :meth:`PetMethod.apply_output`: transform an output site after its bias (adapters);
* :meth:`PetMethod.fused_output`: or compute the whole output site (bias, transform,
  residual, LayerNorm) in one op, when this type's transform is the batch's only one.

Per-task biases, LayerNorms and IA3 scales are not PET-specific: they live in the engine's
slot groups and a method only says which rows it wants (:class:`LoadedTask`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import torch

from petops import reference

from ..backbone import LN_SITES, SITES, BackboneSpec, BackboneWeights
from ..batch import Batch
from ..errors import TaskError
from ..tables import Allocation, FlatPool, SlotGroup

# HF BertModel module path (within encoder.layer.{i}) -> (site, column block of the site output)
MODULES: dict[str, tuple[str, int]] = {
    "attention.self.query": ("qkv", 0),
    "attention.self.key": ("qkv", 1),
    "attention.self.value": ("qkv", 2),
    "attention.output.dense": ("attn_out", 0),
    "intermediate.dense": ("ffn_in", 0),
    "output.dense": ("ffn_out", 0),
}
# Short aliases accepted in manifests (PEFT target_modules style).
MODULE_ALIASES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}
LN_MODULES = {"attn_ln": "attention.output.LayerNorm", "ffn_ln": "output.LayerNorm"}


@dataclass
class PetContext:
    """What a PET method may touch: the backbone and the pooled tables on the device."""

    spec: BackboneSpec
    device: torch.device
    dtype: torch.dtype
    backbone: BackboneWeights  # on device, serving dtype
    bias: SlotGroup  # tables "qkv", "attn_out", "ffn_in", "ffn_out": [L, P, N]
    ln: SlotGroup  # tables "<ln>.gamma"/"<ln>.beta" for emb_ln [1,P,H], attn_ln, ffn_ln [L,P,H]
    scale: SlotGroup  # IA3 tables "qkv" [L,Q,3H], "ffn_in" [L,Q,F]
    ops: ModuleType = reference  # petops.ops or petops.reference (pets.kernels.select)
    maskbert_format: str = "auto"  # MASKBERT_FORMAT: auto | csr | bitmask (pet/maskbert.py)

    def pool(self, dtype: torch.dtype | None = None) -> FlatPool:
        return FlatPool(self.device, dtype or self.dtype)


@dataclass
class OutputEpilogue:
    """Operands of one output site's epilogue ``LN(y + bias + residual)`` for one layer.

    ``T`` tokens, ``S`` segments, ``H`` hidden; the ``seg_*`` rows index the pooled tables as
    in :func:`petops.reference.bias_residual_layernorm`.
    """

    y: torch.Tensor  # [T, H] shared GEMM output, no bias
    residual: torch.Tensor  # [T, H]
    bias: torch.Tensor  # [P, H] bias pool of this site and layer
    seg_bias: torch.Tensor  # [S] int32 rows of bias
    gamma: torch.Tensor  # [G, H] LayerNorm pools of this layer
    beta: torch.Tensor  # [G, H]
    seg_ln: torch.Tensor  # [S] int32 rows of gamma / beta
    seg_indptr: torch.Tensor  # [S + 1] int32
    eps: float

    def layernorm(self, ops: Any) -> torch.Tensor:
        """The plain epilogue, no transform: ``ops.bias_residual_layernorm``. ``[T, H]``."""
        return ops.bias_residual_layernorm(
            self.y,
            self.residual,
            self.bias,
            self.gamma,
            self.beta,
            self.seg_indptr,
            self.seg_bias,
            self.seg_ln,
            self.eps,
        )


@dataclass
class LoadedTask:
    """A task's footprint: its slot-group rows and pool allocations."""

    bias_slot: int = 0
    ln_slot: int = 0
    scale_slot: int = 0
    allocations: list[tuple[FlatPool, Allocation]] = field(default_factory=list)
    # Ranges of pools that mirror another pool's layout (sparse values beside their indices):
    # counted in nbytes, freed with the allocation they mirror, never released themselves.
    mirrored: list[tuple[FlatPool, Allocation]] = field(default_factory=list)
    state: Any = None  # method-private

    def nbytes(self, ctx: PetContext) -> int:
        n = sum(a.size * p.data.element_size() for p, a in (*self.allocations, *self.mirrored))
        for slot, group in (
            (self.bias_slot, ctx.bias),
            (self.ln_slot, ctx.ln),
            (self.scale_slot, ctx.scale),
        ):
            if slot:
                n += group.row_bytes()
        return n


class PetMethod(ABC):
    """Base class of the PET types. Subclasses register with :func:`register_pet`."""

    name: ClassVar[str]
    code: ClassVar[int]  # small integer id, stable for a process
    has_output_transform: ClassVar[bool] = False

    def __init__(self, ctx: PetContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def validate(self, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Raise :class:`TaskError` naming the problem if the task cannot be served."""

    @abstractmethod
    def load(
        self, slot: int, hparams: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> LoadedTask:
        """Place a validated task's weights; ``slot`` is its engine-wide task slot."""

    def unload(self, slot: int, loaded: LoadedTask) -> None:
        """Free everything :meth:`load` took."""
        for pool, alloc in loaded.allocations:
            pool.release(alloc)
        self.ctx.bias.free(loaded.bias_slot)
        self.ctx.ln.free(loaded.ln_slot)
        self.ctx.scale.free(loaded.scale_slot)

    def prepare(self, batch: Batch, segs: torch.Tensor) -> Any:
        """Per-batch plan for this type's segments ``segs`` (host int64 ``[Sm]``, non-empty)."""
        return None

    def apply_linear(
        self, plan: Any, site: str, layer: int, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add this type's delta to ``y = x @ W[site, layer].T`` in place.

        Args:
            x: ``[T, K]`` site input; y: ``[T, N]`` shared GEMM output (no bias yet).
        The default adds nothing (BitFit, IA3 and "none" act only through the epilogue).
        """
        return None

    def apply_output(self, plan: Any, site: str, layer: int, h: torch.Tensor) -> None:
        """Transform ``h`` (``[T, H]``, output site after bias, before residual+LN) in place.

        Only types with ``has_output_transform`` (adapters, IA3 output scales) are called, and
        only with a plan: :meth:`prepare` returning None says the batch's tasks of this type
        leave the output sites alone. The default is a no-op.
        """
        return None

    def fused_output(
        self, plan: Any, site: str, layer: int, ep: OutputEpilogue
    ) -> torch.Tensor | None:
        """The whole output site in one op, or None where this type cannot fuse it.

        Called instead of bias + :meth:`apply_output` + residual LayerNorm when this type's
        plan is the batch's only output transform (and shadow ops are not spread over
        streams). Must equal that unfused sequence, including its intermediate roundings.

        Returns:
            ``[T, H]`` ``LN(transform(ep.y + bias) + ep.residual)`` with the per-segment
            gamma/beta, or None (the default): the engine then runs the unfused ops.
        """
        return None


_REGISTRY: dict[str, type[PetMethod]] = {}


def register_pet(cls: type[PetMethod]) -> type[PetMethod]:
    """Class decorator adding a PET type to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(
            f"PET type {cls.name!r} is registered twice ({_REGISTRY[cls.name]} and "
            f"{cls}); give the new class another name"
        )
    if any(c.code == cls.code for c in _REGISTRY.values()):
        raise ValueError(f"PET code {cls.code} of {cls.name!r} is taken; pick an unused code")
    _REGISTRY[cls.name] = cls
    return cls


def pet_types() -> dict[str, type[PetMethod]]:
    """Registered PET types by name."""
    return dict(_REGISTRY)


def get_pet_type(name: str) -> type[PetMethod]:
    if name not in _REGISTRY:
        raise TaskError(
            f"unknown PET type {name!r}; known types are {sorted(_REGISTRY)}. "
            "Add a module under backend/pets/pet/ and register it with @register_pet"
        )
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# Helpers shared by several PET types
# ---------------------------------------------------------------------------------------------


def layer_key(layer: int, module: str, suffix: str) -> str:
    return f"encoder.layer.{layer}.{module}.{suffix}"


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], floating: bool = True) -> None:
    """Raise :class:`TaskError` unless ``t`` has ``shape``, a suitable dtype and finite values."""
    if tuple(t.shape) != shape:
        raise TaskError(
            f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape} for this "
            "backbone; was the task trained on another backbone?"
        )
    if floating:
        if not t.is_floating_point():
            raise TaskError(f"tensor {name!r} has dtype {t.dtype}, expected a float dtype")
        if not torch.isfinite(t).all():
            raise TaskError(f"tensor {name!r} contains NaN or Inf; re-export the task")


def check_known(tensors: dict[str, torch.Tensor], allowed: set[str], pet: str) -> None:
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise TaskError(
            f"{len(unknown)} unexpected tensor name(s) for a {pet} task: {shown}; "
            "see the README's task-store section for the names each type uses"
        )


def bias_names(spec: BackboneSpec) -> dict[str, tuple[str, int, int]]:
    """Tensor name -> (site, layer, column block) for every linear bias."""
    out = {}
    for i in range(spec.layers):
        for module, (site, block) in MODULES.items():
            out[layer_key(i, module, "bias")] = (site, i, block)
    return out


def ln_names(spec: BackboneSpec) -> dict[str, tuple[str, int, str]]:
    """Tensor name -> (ln site, layer, 'gamma'|'beta') for every LayerNorm."""
    out = {
        "embeddings.LayerNorm.weight": ("emb_ln", 0, "gamma"),
        "embeddings.LayerNorm.bias": ("emb_ln", 0, "beta"),
    }
    for i in range(spec.layers):
        for ln, module in LN_MODULES.items():
            out[layer_key(i, module, "weight")] = (ln, i, "gamma")
            out[layer_key(i, module, "bias")] = (ln, i, "beta")
    return out


def check_bias_ln(spec: BackboneSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Validate any bias / LayerNorm tensors present (all optional)."""
    h = spec.hidden
    for name, (site, _, _) in bias_names(spec).items():
        if name in tensors:
            out = spec.site_shape(site)[0] // (3 if site == "qkv" else 1)
            check_tensor(name, tensors[name], (out,))
    for name in ln_names(spec):
        if name in tensors:
            check_tensor(name, tensors[name], (h,))


def alloc_bias_ln(ctx: PetContext, tensors: dict[str, torch.Tensor], loaded: LoadedTask) -> None:
    """Give the task its own bias / LN rows if it carries any such tensors."""
    spec = ctx.spec
    bnames = bias_names(spec)
    if any(n in tensors for n in bnames):
        rows = {s: ctx.bias.shared(s).clone() for s in SITES}
        for name, (site, layer, block) in bnames.items():
            if name in tensors:
                w = tensors[name].shape[0]
                rows[site][layer, block * w : (block + 1) * w] = tensors[name].to(rows[site].dtype)
        loaded.bias_slot = ctx.bias.alloc(rows)
    lnames = ln_names(spec)
    if any(n in tensors for n in lnames):
        lrows = {name: ctx.ln.shared(name).clone() for name in ctx.ln.names}
        for name, (ln, layer, kind) in lnames.items():
            if name in tensors:
                lrows[f"{ln}.{kind}"][layer] = tensors[name].to(lrows[f"{ln}.{kind}"].dtype)
        loaded.ln_slot = ctx.ln.alloc(lrows)


BIAS_LN_SITES = (*SITES, *LN_SITES)


def positive_int(hparams: dict[str, Any], key: str, pet: str) -> int:
    v = hparams.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TaskError(f"{pet} task needs integer hyper-parameter {key!r} >= 1, got {v!r}")
    return v


def finite_float(hparams: dict[str, Any], key: str, pet: str, default: float) -> float:
    v = hparams.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise TaskError(f"{pet} task hyper-parameter {key!r} must be a finite number, got {v!r}")
    return float(v)
