"""Helpers shared by the PET types: tensor names, checks, bias/LayerNorm rows, random draws.

Everything here is type-neutral; a helper that only one type needs lives in that type's
module. Tensor names follow the HF ``BertModel`` state dict (docs/task-store.md):
``encoder.layer.{i}.{module}.{suffix}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..backbone import SITES, BackboneSpec, BackboneWeights
from ..errors import TaskError, short

if TYPE_CHECKING:  # annotations only: base.py imports this module
    from .base import LoadedTask, PetContext

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


def layer_key(layer: int, module: str, suffix: str) -> str:
    return f"encoder.layer.{layer}.{module}.{suffix}"


def module_shape(spec: BackboneSpec, module: str) -> tuple[int, int]:
    """``(out, in)`` of one BERT linear ``module`` (a third of the fused QKV site for q/k/v)."""
    site, _ = MODULES[module]
    out, inp = spec.site_shape(site)
    return (out // 3 if site == "qkv" else out, inp)


# ---------------------------------------------------------------------------------- checks
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


def check_known(tensors: Mapping[str, torch.Tensor], allowed: set[str], pet: str) -> None:
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise TaskError(
            f"{len(unknown)} unexpected tensor name(s) for a {pet} task: {shown}; "
            "see docs/task-store.md for the names each type uses"
        )


def check_same_sites(
    tensors: Mapping[str, torch.Tensor],
    layers: int,
    sites: Iterable[str],
    parts: Sequence[str],
    key: Callable[[int, str, str], str],
    pet: str,
) -> list[str]:
    """The sites a task adapts, which must be the same at every layer, with every part.

    A site counts as adapted when layer 0 carries its first part (``key(0, site, parts[0])``);
    then every layer must carry every part of exactly those sites.

    Args:
        sites: the candidate sites (modules), in a fixed order; parts: the tensor suffixes one
            adapted site carries per layer; key: ``(layer, site, part) -> tensor name``.
    Returns:
        The adapted sites, in the order of ``sites``.
    Raises:
        TaskError: no site is adapted, or the first tensor that is missing or out of place.
    """
    sites = list(sites)
    present = [s for s in sites if key(0, s, parts[0]) in tensors]
    if not present:
        raise TaskError(
            f"{pet} task has no {parts[0]!r} tensor at layer 0 (e.g. "
            f"{key(0, sites[0], parts[0])!r}); a {pet} task adapts the same sites at every layer"
        )
    for i in range(layers):
        for s in sites:
            for p in parts:
                name = key(i, s, p)
                if (name in tensors) != (s in present):
                    state = "missing" if s in present else "unexpected"
                    raise TaskError(
                        f"{pet} tensor {name!r} is {state}: every layer must adapt the same "
                        f"sites as layer 0 ({present}), each with {list(parts)}"
                    )
    return present


# ---------------------------------------------------------------- biases and LayerNorms
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


def bias_width(spec: BackboneSpec, site: str) -> int:
    """Width of one module's bias at ``site`` (a third of the fused QKV output)."""
    return spec.site_shape(site)[0] // (3 if site == "qkv" else 1)


def check_bias_ln(spec: BackboneSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Validate any bias / LayerNorm tensors present (all optional)."""
    for name, (site, _, _) in bias_names(spec).items():
        if name in tensors:
            check_tensor(name, tensors[name], (bias_width(spec, site),))
    for name in ln_names(spec):
        if name in tensors:
            check_tensor(name, tensors[name], (spec.hidden,))


def alloc_bias_ln(ctx: PetContext, tensors: Mapping[str, torch.Tensor], loaded: LoadedTask) -> None:
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


def random_bias_ln(
    w: BackboneWeights, g: torch.Generator, std: float, emb_ln: bool = True, biases: bool = True
) -> dict[str, torch.Tensor]:
    """The backbone's biases and LayerNorms plus ``N(0, std)`` noise (a task that trained them).

    Draws biases first, then LayerNorms in :func:`ln_names` order, so a seed gives the same
    tensors whichever type asks; ``emb_ln=False`` / ``biases=False`` leave those out (and draw
    nothing for them).
    """
    spec, out = w.spec, {}
    if biases:
        for name, (site, layer, block) in bias_names(spec).items():
            width = bias_width(spec, site)
            base = w.bias[site][layer][block * width : (block + 1) * width]
            out[name] = base + torch.randn(width, generator=g) * std
    for name, (ln, layer, kind) in ln_names(spec).items():
        if ln == "emb_ln" and not emb_ln:
            continue
        base = (w.ln_gamma if kind == "gamma" else w.ln_beta)[ln][layer]
        out[name] = base + torch.randn(spec.hidden, generator=g) * std
    return out


# ------------------------------------------------------------------ hyper-parameter parsing
def positive_int(hparams: Mapping[str, Any], key: str, pet: str) -> int:
    v = hparams.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TaskError(f"{pet} task needs integer hyper-parameter {key!r} >= 1, got {short(v)}")
    return v


def finite_float(hparams: Mapping[str, Any], key: str, pet: str, default: float) -> float:
    v = hparams.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise TaskError(
            f"{pet} task hyper-parameter {key!r} must be a finite number, got {short(v)}"
        )
    return float(v)


def flag(hparams: Mapping[str, Any], key: str, pet: str, default: bool = False) -> bool:
    v = hparams.get(key, default)
    if not isinstance(v, bool):
        raise TaskError(f"{pet} task hyper-parameter {key!r} must be true or false, got {short(v)}")
    return v


def module_list(
    hparams: Mapping[str, Any], key: str, pet: str, default: Sequence[str]
) -> list[str]:
    """A list of module names (any strings; the caller checks them), ``default`` if absent."""
    v = hparams.get(key, list(default))
    if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(m, str) for m in v):
        raise TaskError(
            f"{pet} hyper-parameter {key!r} must be a list of module names, got {short(v)}"
        )
    return v
