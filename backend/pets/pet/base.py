"""The one interface every PET type implements, and the registry of types.

A PET type is one module under ``pets/pet/`` holding everything about it; nothing outside
``pets/pet/`` names a type. Its class (a :class:`PetMethod` registered with
:func:`register_pet`) declares:

* ``Config``: its hyper-parameters as a frozen :class:`PetConfig` dataclass, parsed and checked
  from a manifest's ``hparams`` dict (:meth:`PetConfig.from_hparams`);
* :meth:`PetMethod.generate`: a random task of the type (tests, demos, benchmarks, capacity),
  with ``default_options`` / ``demo_options`` for its knobs;
* :meth:`PetMethod.analytic_cost`: its terms in the scheduler's analytic cost model;
* the serving hooks below.

A type turns a task's tensors (named as in the HF ``BertModel`` state dict, see
docs/task-store.md) into rows of the pooled tables, and at serving time adds its
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

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import torch

from petops import reference

from ..backbone import BackboneSpec, BackboneWeights
from ..batch import Batch
from ..errors import TaskError
from ..tables import Allocation, FlatPool, SlotGroup

# Re-exported for the callers that import them from here (registry.py, heads.py); new code
# imports the shared helpers from .common.
from .common import check_known as check_known
from .common import check_tensor as check_tensor

C = TypeVar("C", bound="PetConfig")


@dataclass(frozen=True)
class PetConfig:
    """A type's hyper-parameters, parsed from a manifest's ``hparams`` and checked.

    Subclasses add typed fields (with defaults where the manifest may omit a key) and
    override :meth:`from_hparams`. Keys a config does not name are informational (e.g. a
    LoRA task's ``target_modules``, an imported task's ``source_architecture``) and ignored,
    as the engine always did. This base, with no fields, serves types without
    hyper-parameters.
    """

    @classmethod
    def from_hparams(cls: type[C], hparams: Mapping[str, Any]) -> C:
        """Parse ``hparams``; raise :class:`TaskError` naming the bad key, value and fix."""
        return cls()

    def to_hparams(self) -> dict[str, Any]:
        """The manifest form (JSON types: tuples become lists); ``from_hparams`` inverts it."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class CostDims:
    """What a type's analytic cost terms may depend on (see ``scheduling/analytic.py``)."""

    hidden: float  # H
    ffn: float  # F
    sparse_efficiency: float  # share of dense throughput a sparse product reaches
    small_gemm_efficiency: float  # share of dense throughput a rank-r product reaches

    @property
    def linear_weights(self) -> float:
        """Weights of one layer's linears, ``4H² + 2HF``."""
        return 4.0 * self.hidden * self.hidden + 2.0 * self.hidden * self.ffn


@dataclass(frozen=True)
class PetCost:
    """A type's shadow work per token per layer, beyond the epilogue every task pays."""

    flops: float = 0.0  # dense-equivalent FLOPs: the type's FLOPs / its kernels' efficiency
    epilogue_elements: float = 0.0  # elements beyond the shared per-task epilogue (5H + F)


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
    maskbert_format: str = "auto"  # MASKBERT_FORMAT: auto | index | bitmask (pet/maskbert.py)
    # Set by the encoder while it prepares a batch: the batch's Stager (one copy per forward).
    upload: Callable[[torch.Tensor], torch.Tensor] | None = None

    def pool(self, dtype: torch.dtype | None = None) -> FlatPool:
        return FlatPool(self.device, dtype or self.dtype)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A plan's host array on the device: staged while a batch is prepared (valid once the
        engine flushes the stage, before any kernel runs), else copied directly.

        Use it in :meth:`PetMethod.prepare` for arrays that only kernels read; an array a
        device op consumes during ``prepare`` itself must be copied with ``.to(device)``.
        """
        if self.upload is not None:
            return self.upload(t)
        return t.to(self.device, non_blocking=True)


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
    # The type computes this task's linear layers in full (MaskBERT as a bit mask): its
    # tokens skip the shared GEMMs, so its batches must put it last (``batch.build_batch``).
    owns_linear: bool = False
    # How the type holds this task where it has a choice (MaskBERT: "bitmask" or "index"),
    # for the registry's log line; "" where it has none.
    form: str = ""

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
    code: ClassVar[int]  # small integer id, stable for a process; orders pet_types()
    has_output_transform: ClassVar[bool] = False
    Config: ClassVar[type[PetConfig]] = PetConfig
    # generate()'s options when the caller gives none (shown by `pets create --help`)
    default_options: ClassVar[dict[str, Any]] = {}
    # options of this type's task in the demo store (`pets demo-store`), None: not in it
    demo_options: ClassVar[dict[str, Any] | None] = None
    # False only for a type that serves the bare backbone ("none"); the tests check both ways
    changes_output: ClassVar[bool] = True
    # `pets import-peft`: PEFT's peft_type this type imports (None: not importable), the
    # substring that marks its tensors in PEFT state dicts and the suffixes of its layers'
    peft_type: ClassVar[str | None] = None
    peft_marker: ClassVar[str] = ""
    peft_suffixes: ClassVar[tuple[str, ...]] = ()
    # `pets import-finetuned --as <name>`: whether a full fine-tuned checkpoint imports as this
    imports_finetuned: ClassVar[bool] = False

    def __init__(self, ctx: PetContext) -> None:
        self.ctx = ctx

    # -- what a type is, independent of a device (classmethods) -----------------------------
    @classmethod
    @abstractmethod
    def generate(
        cls, weights: BackboneWeights, options: dict[str, Any], seed: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A random task of this type on ``weights`` (fp32, host), for tests and demos.

        The weights are sized like real tasks and large enough to visibly change the output,
        so an oracle comparison cannot pass vacuously.

        Args:
            options: ``default_options`` updated with the caller's (generation knobs such as a
                density or a bottleneck, and/or the config's own keys).
            seed: the same seed gives the same tensors.
        Returns:
            ``(hparams, tensors)``: the manifest's hyper-parameters (they parse with
            ``Config.from_hparams``) and the PET tensors (task-store names, no head).
        """

    @classmethod
    @abstractmethod
    def analytic_cost(cls, dims: CostDims) -> PetCost:
        """This type's term in the analytic cost model (a typical task of the type)."""

    @classmethod
    def check_peft_config(cls, cfg: Mapping[str, Any]) -> None:
        """Refuse (:class:`TaskError`) PEFT config fields whose math this type does not
        implement; called before the tensors are read. Types with ``peft_type`` may override."""
        return None

    @classmethod
    def peft_hparams(
        cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor], modules: list[str]
    ) -> dict[str, Any]:
        """The manifest hparams of a PEFT adapter of this type (``peft_type`` types only).

        Args:
            tensors: the adapter's layer tensors under task-store names (may be reshaped in
                place to the task-store layout); modules: the BERT modules they adapt.
        """
        raise NotImplementedError(f"PET type {cls.name!r} does not import PEFT adapters")

    @classmethod
    def from_weight_deltas(
        cls, deltas: Iterable[tuple[int, str, torch.Tensor]], density: float
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
        """A fine-tuned checkpoint as this type (``imports_finetuned`` types only).

        Args:
            deltas: ``(layer, module, W_ft - W)`` per BERT linear, ``[out, in]`` fp32, lazily;
                density: the share of each matrix a sparse type keeps.
        Returns:
            ``(hparams, tensors, warnings)``: the weight tensors only; the importer adds the
            checkpoint's biases, LayerNorms and head.
        """
        raise NotImplementedError(f"PET type {cls.name!r} does not import fine-tuned weights")

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

    def linear_sites(self, plan: Any) -> Collection[str]:
        """The sites (of ``backbone.SITES``) whose GEMM output :meth:`apply_linear` changes
        for ``plan``. The encoder fuses a site's activation into its shared GEMM only where
        no plan of the batch changes that GEMM's output. Types that override
        :meth:`apply_linear` must override this too; the default is none."""
        return ()

    def apply_output(self, plan: Any, site: str, layer: int, h: torch.Tensor) -> None:
        """Transform ``h`` (``[T, H]``, output site after bias, before residual+LN) in place.

        Only types with ``has_output_transform`` (adapters, IA3 output scales) are called, and
        only with a plan: :meth:`prepare` returning None says the batch's tasks of this type
        leave the output sites alone. The default is a no-op.
        """
        return None

    def prepare_unfused(self, plan: Any) -> None:
        """Called while the batch is prepared when its output sites will run unfused (bias,
        :meth:`apply_output`, LayerNorm): build what :meth:`apply_output` needs beyond
        ``plan`` now, through :meth:`PetContext.to_device`, rather than on first use while
        the forward runs (a captured CUDA graph must find every array staged). Default: none.
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
    """Registered PET types by name, in ``code`` order (the order every list of types uses)."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: kv[1].code))


def bare_type() -> str:
    """The registered type that serves the bare backbone (``changes_output`` False): the
    profiler's probe of the shared ops alone."""
    bare = [name for name, cls in pet_types().items() if not cls.changes_output]
    if len(bare) != 1:
        raise ValueError(f"expected one registered PET type with changes_output=False, got {bare}")
    return bare[0]


def get_pet_type(name: str) -> type[PetMethod]:
    if name not in _REGISTRY:
        raise TaskError(
            f"unknown PET type {name!r}; known types are {sorted(_REGISTRY)}. "
            "Add a module under backend/pets/pet/ and register it with @register_pet"
        )
    return _REGISTRY[name]
