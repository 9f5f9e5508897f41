"""Independent oracles: HF ``transformers`` BertModel (and PEFT for LoRA) with a task applied.

Each oracle builds the task's model the way its method defines it (merged weights, hooks
that implement the published formula, or PEFT's own LoRA layers), independently of the
engine's shared-GEMM + shadow-op split, and returns the head output for one sequence.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from pets.backbone import BackboneWeights, hf_config, state_from_weights
from pets.pet.common import MODULES, module_shape
from pets.pet.maskbert import unpack_mask
from pets.taskstore import TaskManifest

HF_NAMES = {
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
}


def base_model(w: BackboneWeights) -> BertModel:
    model = BertModel(BertConfig(**hf_config(w.spec)), add_pooling_layer=True)
    missing, unexpected = model.load_state_dict(state_from_weights(w), strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k or "pooler" in k for k in missing), missing
    return model.eval()


def _merged_state(
    w: BackboneWeights, manifest: TaskManifest, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state_from_weights(w).items()}
    # Biases and LayerNorms carried by the task replace the backbone's (BitFit, Diff, Adapter).
    for k, v in tensors.items():
        if k in state and (k.endswith(".bias") or "LayerNorm" in k):
            state[k] = v.float()
    for i in range(w.spec.layers):
        for m in MODULES:
            key = f"encoder.layer.{i}.{m}"
            if f"{key}.weight_delta_indices" in tensors:
                delta = torch.zeros(module_shape(w.spec, m)).reshape(-1)
                delta[tensors[f"{key}.weight_delta_indices"].long()] = tensors[
                    f"{key}.weight_delta_values"
                ].float()
                base = state[f"{key}.weight"]
                state[f"{key}.weight"] = base + delta.view_as(base)
            if f"{key}.weight_mask" in tensors:
                keep = unpack_mask(tensors[f"{key}.weight_mask"], module_shape(w.spec, m))
                state[f"{key}.weight"] = state[f"{key}.weight"] * keep
    return state


def _attach_adapters(
    model: BertModel, manifest: TaskManifest, tensors: dict[str, torch.Tensor]
) -> None:
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


def _lora_model(
    model: BertModel, manifest: TaskManifest, tensors: dict[str, torch.Tensor]
) -> torch.nn.Module:
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


def task_model(
    w: BackboneWeights, manifest: TaskManifest, tensors: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The oracle model of one task (a BertModel, or a PEFT model wrapping one)."""
    model = BertModel(BertConfig(**hf_config(w.spec)), add_pooling_layer=True).eval()
    state = _merged_state(w, manifest, tensors)
    if "pooler.dense.weight" in tensors:
        state["pooler.dense.weight"] = tensors["pooler.dense.weight"].float()
        state["pooler.dense.bias"] = tensors["pooler.dense.bias"].float()
    model.load_state_dict(state, strict=False)
    if manifest.pet_type == "adapter":
        _attach_adapters(model, manifest, tensors)
    if manifest.pet_type == "lora":
        return _lora_model(model, manifest, tensors)
    return model


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
