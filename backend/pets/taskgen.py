"""Random-init tasks for demos, tests and benchmarks, in the task-store tensor format.

The weights are random but sized like real tasks and large enough to visibly change the
backbone's output, so a test that compares against an oracle cannot pass vacuously.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .backbone import BackboneWeights
from .heads import HeadConfig
from .pet.adapter import ADAPTER_SITES
from .pet.base import MODULES, bias_names, layer_key, ln_names
from .pet.diff_pruning import module_shape
from .pet.ia3 import peft_match
from .pet.maskbert import pack_mask
from .taskstore import TaskManifest

DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "bitfit": {},
    "diff_pruning": {"density": 0.01},
    "maskbert": {"density": 0.05},  # share of weights masked out
    "adapter": {"bottleneck": 64, "activation": "relu"},
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    "ia3": {"target_modules": ["key", "value", "output.dense"]},
}
LORA_TARGETS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
    "dense": "attention.output.dense",
}


def _bias_ln(w: BackboneWeights, g: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    spec, out = w.spec, {}
    h = spec.hidden
    for name, (site, layer, block) in bias_names(spec).items():
        width = spec.site_shape(site)[0] // (3 if site == "qkv" else 1)
        base = w.bias[site][layer][block * width : (block + 1) * width]
        out[name] = base + torch.randn(width, generator=g) * std
    for name, (ln, layer, kind) in ln_names(spec).items():
        base = (w.ln_gamma if kind == "gamma" else w.ln_beta)[ln][layer]
        out[name] = base + torch.randn(h, generator=g) * std
    return out


def random_tensors(
    w: BackboneWeights, pet_type: str, hparams: dict[str, Any], seed: int
) -> dict[str, torch.Tensor]:
    """PET tensors of a random task of ``pet_type`` on backbone ``w``."""
    g = torch.Generator().manual_seed(seed)
    spec = w.spec

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t: dict[str, torch.Tensor] = {}
    if pet_type == "bitfit":
        t.update(_bias_ln(w, g, 0.1))
    elif pet_type == "diff_pruning":
        t.update(_bias_ln(w, g, 0.05))
        for i in range(spec.layers):
            for m in MODULES:
                out, inp = module_shape(spec, m)
                nnz = max(1, int(hparams.get("density", 0.01) * out * inp))
                idx = torch.randperm(out * inp, generator=g)[:nnz].sort().values
                t[layer_key(i, m, "weight_delta_indices")] = idx.to(torch.int32)
                t[layer_key(i, m, "weight_delta_values")] = rnd(nnz, std=0.05)
    elif pet_type == "maskbert":
        rng = np.random.default_rng(seed)
        for i in range(spec.layers):
            for m in MODULES:
                out, inp = module_shape(spec, m)
                keep = torch.from_numpy(rng.random((out, inp)) >= hparams.get("density", 0.05))
                t[layer_key(i, m, "weight_mask")] = pack_mask(keep)
    elif pet_type == "adapter":
        r, h = int(hparams.get("bottleneck", 64)), spec.hidden
        for i in range(spec.layers):
            for module in ADAPTER_SITES.values():
                for part, shape, std in (
                    ("down.weight", (r, h), 0.05),
                    ("down.bias", (r,), 0.05),
                    ("up.weight", (h, r), 0.05),
                    ("up.bias", (h,), 0.05),
                ):
                    t[layer_key(i, module, f"adapter.{part}")] = rnd(*shape, std=std)
        for name, (ln, layer, kind) in ln_names(spec).items():
            if ln != "emb_ln":
                base = (w.ln_gamma if kind == "gamma" else w.ln_beta)[ln][layer]
                t[name] = base + rnd(spec.hidden, std=0.05)
    elif pet_type == "lora":
        r = int(hparams["r"])
        for target in hparams.get("target_modules", ["query", "value"]):
            m = LORA_TARGETS[target]
            out, inp = module_shape(spec, m)
            for i in range(spec.layers):
                t[layer_key(i, m, "lora_A.weight")] = rnd(r, inp, std=0.1)
                t[layer_key(i, m, "lora_B.weight")] = rnd(out, r, std=0.1)
    elif pet_type == "ia3":  # PEFT semantics: suffix-matched targets, scales around 1 +- 0.3
        ff = set(peft_match(hparams.get("feedforward_modules", ["output.dense"])))
        for m in peft_match(hparams.get("target_modules", ["key", "value", "output.dense"])):
            width = spec.ffn if (m == "output.dense" and m in ff) else spec.hidden
            for i in range(spec.layers):
                t[layer_key(i, m, "ia3_l")] = 1 + (torch.rand(width, generator=g) * 2 - 1) * 0.3
    elif pet_type == "none":
        pass
    else:
        from .pet import get_pet_type

        get_pet_type(pet_type)  # raises for unknown types
        raise ValueError(f"no random generator for PET type {pet_type!r}")
    return t


def random_head(w: BackboneWeights, head: HeadConfig, seed: int) -> dict[str, torch.Tensor]:
    if head.kind != "classification":
        return {}
    g = torch.Generator().manual_seed(seed + 7919)
    h = w.spec.hidden
    return {
        "classifier.weight": torch.randn(head.num_labels, h, generator=g) * 0.2,
        "classifier.bias": torch.randn(head.num_labels, generator=g) * 0.1,
    }


def random_task(
    w: BackboneWeights,
    name: str,
    pet_type: str,
    head: HeadConfig,
    seed: int = 0,
    hparams: dict[str, Any] | None = None,
) -> tuple[TaskManifest, dict[str, torch.Tensor]]:
    """A complete random task: manifest + tensors (PET + head)."""
    hp = dict(DEFAULT_HPARAMS.get(pet_type, {}))
    hp.update(hparams or {})
    tensors = random_tensors(w, pet_type, hp, seed)
    tensors.update(random_head(w, head, seed))
    stored_hp = {k: v for k, v in hp.items() if k not in ("density",)}
    if pet_type == "lora":
        stored_hp = {
            "r": hp["r"],
            "lora_alpha": hp.get("lora_alpha", hp["r"]),
            "target_modules": list(hp.get("target_modules", [])),
        }
    if pet_type == "adapter":
        stored_hp = {"activation": hp.get("activation", "relu")}
    if pet_type == "ia3":  # manifests name exact modules; PEFT-style suffixes are resolved here
        ff = set(peft_match(hp.get("feedforward_modules", ["output.dense"])))
        targets = peft_match(hp.get("target_modules", ["key", "value", "output.dense"]))
        stored_hp = {
            "target_modules": targets,
            "feedforward_modules": [m for m in targets if m in ff],
        }
    manifest = TaskManifest(
        name=name,
        pet_type=pet_type,
        hparams=stored_hp,
        head=head,
        backbone_fingerprint=w.spec.fingerprint,
        created=time.time(),
    )
    return manifest, tensors
