"""Independent oracles: HF ``transformers`` BertModel (and PEFT) with a task applied.

Each oracle builds the task's model the way its method defines it (merged weights, hooks
that implement the published formula, or PEFT's own LoRA / IA3 layers), independently of the
engine's shared-GEMM + shadow-op split, and returns the head output for one sequence.

:data:`ORACLES` holds one oracle per PET type, keyed by type name; adding a type means adding
its oracle there (``tests/test_pet_types.py`` fails for a registered type without one).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from pets.backbone import BackboneWeights, hf_config, state_from_weights
from pets.pet.common import MODULES, module_shape
from pets.pet.maskbert import unpack_mask
from pets.taskstore import TaskManifest

ATOL = 2e-4  # served vs oracle, fp32, 6 layers: observed max-abs error is ~1e-6
Tensors = dict[str, torch.Tensor]
# (the backbone with the task's pooler loaded, the backbone, manifest, tensors) -> task model
Oracle = Callable[[BertModel, BackboneWeights, TaskManifest, Tensors], torch.nn.Module]


def base_model(w: BackboneWeights) -> BertModel:
    model = BertModel(BertConfig(**hf_config(w.spec)), add_pooling_layer=True)
    missing, unexpected = model.load_state_dict(state_from_weights(w), strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k or "pooler" in k for k in missing), missing
    return model.eval()


def _load(model: BertModel, changes: Tensors) -> None:
    """Overwrite some of ``model``'s parameters (names as in its state dict)."""
    _, unexpected = model.load_state_dict(changes, strict=False)
    assert not unexpected, unexpected


def _own_bias_ln(model: BertModel, tensors: Tensors) -> None:
    """Biases and LayerNorms the task carries replace the backbone's (full values)."""
    state = model.state_dict()
    _load(
        model,
        {
            k: v.float()
            for k, v in tensors.items()
            if k in state
            and (k.endswith(".bias") or "LayerNorm" in k)
            and not k.startswith("pooler.")
        },
    )


def _weights(model: BertModel) -> Callable[[int, str], torch.Tensor]:
    state = model.state_dict()
    return lambda i, m: state[f"encoder.layer.{i}.{m}.weight"]


def oracle_none(model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors):
    return model


def oracle_bitfit(model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors):
    _own_bias_ln(model, tensors)
    return model


def oracle_diff_pruning(
    model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors
):
    """``W + delta`` with the sparse delta scattered into a dense matrix."""
    _own_bias_ln(model, tensors)
    weight, changes = _weights(model), {}
    for i in range(w.spec.layers):
        for m in MODULES:
            key = f"encoder.layer.{i}.{m}"
            if f"{key}.weight_delta_indices" in tensors:
                delta = torch.zeros(module_shape(w.spec, m)).reshape(-1)
                delta[tensors[f"{key}.weight_delta_indices"].long()] = tensors[
                    f"{key}.weight_delta_values"
                ].float()
                changes[f"{key}.weight"] = weight(i, m) + delta.view(module_shape(w.spec, m))
    _load(model, changes)
    return model


def oracle_maskbert(model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors):
    """``W * M`` with the unpacked keep-mask."""
    weight, changes = _weights(model), {}
    for i in range(w.spec.layers):
        for m in MODULES:
            key = f"encoder.layer.{i}.{m}"
            if f"{key}.weight_mask" in tensors:
                keep = unpack_mask(tensors[f"{key}.weight_mask"], module_shape(w.spec, m))
                changes[f"{key}.weight"] = weight(i, m) * keep
    _load(model, changes)
    return model


def oracle_adapter(model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors):
    """Houlsby: ``h + up(act(down(h)))`` hooked after each adapted output dense."""
    _own_bias_ln(model, tensors)
    act = {
        "relu": F.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "swish": F.silu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    }[manifest.hparams.get("activation", "relu")]
    for i, layer in enumerate(model.encoder.layer):
        for module, dense in (
            ("attention.output", layer.attention.output.dense),
            ("output", layer.output.dense),
        ):
            p = f"encoder.layer.{i}.{module}.adapter."
            if p + "down.weight" not in tensors:
                continue
            dw, db = tensors[p + "down.weight"].float(), tensors[p + "down.bias"].float()
            uw, ub = tensors[p + "up.weight"].float(), tensors[p + "up.bias"].float()

            def hook(_mod, _inp, out, dw=dw, db=db, uw=uw, ub=ub):  # Houlsby: h + up(act(down h))
                return out + F.linear(act(F.linear(out, dw, db)), uw, ub)

            dense.register_forward_hook(hook)
    return model


def oracle_lora(model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors):
    """PEFT's own LoRA layers with the task's A and B."""
    hp = manifest.hparams
    mods = sorted({k.split(".", 3)[3].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    cfg = LoraConfig(
        r=hp["r"],
        lora_alpha=hp.get("lora_alpha", hp["r"]),
        target_modules=mods,
        lora_dropout=0.0,
        use_rslora=bool(hp.get("use_rslora", False)),
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    sd = peft_model.state_dict()
    loaded = 0
    for k, v in tensors.items():
        if ".lora_" not in k:
            continue
        peft_key = next(n for n in sd if n.endswith(k.replace(".weight", ".default.weight")))
        sd[peft_key] = v.float()
        loaded += 1
    assert loaded == len([k for k in tensors if ".lora_" in k])
    peft_model.load_state_dict(sd)
    return peft_model.eval()


def oracle_ia3(model: BertModel, w: BackboneWeights, manifest: TaskManifest, tensors: Tensors):
    """PEFT's own IA3 layers; modules matched exactly (a regex over full names), scales the
    task does not carry set to 1."""
    mods = sorted({k.split(".", 3)[3].removesuffix(".ia3_l") for k in tensors if "ia3_l" in k})
    ff_default = ["attention.output.dense", "output.dense"]  # the documented default
    ff = [m for m in mods if m in manifest.hparams.get("feedforward_modules", ff_default)]

    def exact(names: list[str]) -> str:
        alts = "|".join(re.escape(n) for n in names) or "(?!)"
        return rf"encoder\.layer\.\d+\.(?:{alts})"

    cfg = IA3Config(
        target_modules=exact(mods), feedforward_modules=exact(ff), init_ia3_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    sd = peft_model.state_dict()
    for k in sd:
        if k.endswith("ia3_l.default"):
            ours = k.removeprefix("base_model.model.").removesuffix(".default")
            value = tensors.get(ours)
            sd[k] = torch.ones_like(sd[k]) if value is None else value.float().reshape(sd[k].shape)
    peft_model.load_state_dict(sd)
    return peft_model.eval()


ORACLES: dict[str, Oracle] = {
    "none": oracle_none,
    "bitfit": oracle_bitfit,
    "diff_pruning": oracle_diff_pruning,
    "maskbert": oracle_maskbert,
    "adapter": oracle_adapter,
    "lora": oracle_lora,
    "ia3": oracle_ia3,
}


def task_model(w: BackboneWeights, manifest: TaskManifest, tensors: Tensors) -> torch.nn.Module:
    """The oracle model of one task (a BertModel, or a PEFT model wrapping one)."""
    if manifest.pet_type not in ORACLES:
        raise KeyError(
            f"no oracle for PET type {manifest.pet_type!r}; add one to ORACLES in tests/oracle.py"
        )
    model = base_model(w)
    if "pooler.dense.weight" in tensors:
        _load(
            model,
            {
                "pooler.dense.weight": tensors["pooler.dense.weight"].float(),
                "pooler.dense.bias": tensors["pooler.dense.bias"].float(),
            },
        )
    return ORACLES[manifest.pet_type](model, w, manifest, tensors)


@torch.no_grad()
def oracle_output(
    model: torch.nn.Module,
    manifest: TaskManifest,
    tensors: dict[str, torch.Tensor],
    ids: np.ndarray,
) -> np.ndarray:
    """Head output of ``model`` for one sequence (float32 ``[D]``)."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None, :]
    out = model(input_ids=x, attention_mask=torch.ones_like(x))
    head = manifest.head
    if head.kind == "classification":
        logits = F.linear(
            out.pooler_output,
            tensors["classifier.weight"].float(),
            tensors["classifier.bias"].float(),
        )
        return logits[0].numpy()
    hidden = out.last_hidden_state[0]
    emb = hidden.mean(0) if head.pooling == "mean" else hidden[0]
    if head.normalize:
        emb = F.normalize(emb, dim=-1)
    return emb.numpy()
