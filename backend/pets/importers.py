"""Importers: PEFT adapter folders and full fine-tuned HF BERT checkpoints -> store tasks.

* :func:`import_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` of a PEFT
  adapter on a BERT model, of a ``peft_type`` some PET type imports (LoRA, IA3: their
  modules hold the config checks and hyper-parameters, :func:`peft_types`) (``BertModel``,
  ``BertForSequenceClassification`` or ``BertForTokenClassification``). A classifier saved
  through ``modules_to_save`` becomes the head (``num_labels`` from its shape; ``task_type``
  ``TOKEN_CLS`` a token_classification head, else classification, or what ``--head``
  says); without one the task gets an embedding head (mean pooling unless told otherwise).
  A LoRA or IA3 on ``bert.pooler.dense`` (PEFT's "all linear" ``target_modules=[...,
  "dense"]`` catches it) is merged into the task's own pooler (:func:`_merge_pooler`); PET
  on any other module outside the BERT linears is refused by name.
* :func:`import_finetuned`: a fine-tuned ``BertForSequenceClassification`` (its
  ``problem_type``: classification, multi_label or regression head),
  ``BertForTokenClassification`` (token_classification) or ``BertModel`` folder -> a task
  of a type with ``imports_finetuned`` (:func:`finetuned_types`): every bias, every
  LayerNorm, the classifier and the fine-tuned pooler (pooled heads), plus what the type
  makes of the weight changes (Diff-Pruning: the top-k ``|W_ft - W|`` per linear at ``density``;
  BitFit: nothing, with a warning).

Everything is validated against the serving backbone (:func:`pets.validate.validate_task`)
before :func:`pets.taskstore.write_task` publishes it, so a refused import leaves the store
untouched. Only safetensors are read; pickle files are refused, never opened.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbone import BackboneWeights, state_from_weights
from .errors import TaskError
from .heads import POOLED_KINDS, HeadConfig
from .pet import PetMethod, pet_types
from .pet.common import MODULES, layer_key
from .taskstore import TaskManifest, check_name, read_weights, write_task
from .validate import validate_task

PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin", "model.ckpt", "model.pt", "tf_model.h5")


def peft_types() -> dict[str, type[PetMethod]]:
    """PEFT ``peft_type`` -> the PET type importing it (types with ``peft_type`` set)."""
    return {c.peft_type: c for c in pet_types().values() if c.peft_type}


def finetuned_types() -> tuple[str, ...]:
    """The PET types a fine-tuned checkpoint imports as (``imports_finetuned``)."""
    return tuple(n for n, c in pet_types().items() if c.imports_finetuned)


def _layer_re() -> re.Pattern[str]:
    """``encoder.layer.{i}.{module}.{suffix}`` for the suffixes of every PEFT-importable type."""
    suffixes = sorted({re.escape(x) for c in peft_types().values() for x in c.peft_suffixes})
    return re.compile(rf"^encoder\.layer\.(\d+)\.(.+)\.({'|'.join(suffixes)})$")


@dataclass
class ImportResult:
    """What an importer produced (already published when ``path`` is set)."""

    manifest: TaskManifest
    tensors: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# -------------------------------------------------------------------------------- helpers
def _refuse_pickle(folder: Path, wanted: str) -> None:
    found = [n for n in PICKLE_FILES if (folder / n).exists()]
    if found:
        raise TaskError(
            f"{folder} holds {found[0]!r}, a pickle file; pickle is never loaded (it "
            f"can run arbitrary code). Re-save it as {wanted!r} (save_pretrained(..., "
            "safe_serialization=True), or convert with safetensors.torch.save_file)"
        )
    raise TaskError(f"{folder} has no {wanted!r}; expected a folder written by save_pretrained")


def _strip(key: str) -> str:
    """PEFT/HF key -> BertModel-relative name (drops base_model.model., bert., adapter names)."""
    for prefix in ("base_model.model.", "bert."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return (
        key.replace(".modules_to_save.default.", ".")
        .replace(".default.", ".")
        .removesuffix(".default")
    )


# The head a source declares: PEFT's ``task_type``, an HF config's ``problem_type`` (which
# refines a sequence classifier) and its ``architectures``.
TASK_TYPES = {"SEQ_CLS": "classification", "TOKEN_CLS": "token_classification"}
PROBLEM_TYPES = {
    "single_label_classification": "classification",
    "multi_label_classification": "multi_label",
    "regression": "regression",
}
ARCHITECTURES = {
    "BertForSequenceClassification": "classification",
    "BertForTokenClassification": "token_classification",
}


def source_head_kind(cfg: dict[str, Any]) -> str | None:
    """The head type an ``adapter_config.json`` (``task_type``) or HF ``config.json``
    (``architectures``, ``problem_type``) declares; None when it declares none we map."""
    kind = TASK_TYPES.get(str(cfg.get("task_type") or "").upper())
    arch = (cfg.get("architectures") or [None])[0]
    kind = kind or ARCHITECTURES.get(str(arch))
    problem = PROBLEM_TYPES.get(str(cfg.get("problem_type")))
    if problem is not None and kind in (None, "classification"):
        kind = problem
    return kind


def _head(
    tensors: dict[str, torch.Tensor], head: HeadConfig | None, source: str | None = None
) -> HeadConfig:
    """The task's head: a saved classifier gives ``num_labels``; the kind is ``--head``'s,
    else the source's (:func:`source_head_kind`), else single-label classification.
    Without a classifier: ``--head`` (an embedding head) or mean-pooled embeddings."""
    if "classifier.weight" in tensors:
        n = int(tensors["classifier.weight"].shape[0])
        if head is not None and (
            not head.has_classifier or head.num_labels not in (0, n)
        ):  # num_labels 0: "as the classifier says" (the CLI's --head)
            raise TaskError(
                f"the checkpoint carries a {n}-label classifier but --head asks for "
                f"{head.to_json()}; drop --head or the classifier"
            )
        if (
            source is not None
            and head is not None
            and (source == "token_classification") != (head.kind == "token_classification")
        ):
            raise TaskError(
                f"the checkpoint is a {source} model but --head asks for {head.kind}; a "
                "token classifier reads every token, a sequence classifier the pooled [CLS]: "
                "drop --head"
            )
        kind = head.kind if head is not None else (source or "classification")
        output = head.output if head is not None else "logits"
        return HeadConfig.parse(HeadConfig(kind, num_labels=n, output=output).to_json())
    if head is not None and head.has_classifier:
        raise TaskError(
            f"--head {head.kind} needs a classifier in the checkpoint "
            "(modules_to_save=['classifier']); none was found"
        )
    if source is not None and head is None:
        raise TaskError(
            f"the checkpoint is a {source} model (task_type/architectures) but carries no "
            "classifier; save it with modules_to_save=['classifier'], or pass --head "
            "embedding to serve its encoder alone"
        )
    return head or HeadConfig("embedding", pooling="mean")


def _check_spec(weights: BackboneWeights, cfg: dict[str, Any], where: Path) -> None:
    spec = weights.spec
    want = {
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.ffn,
    }
    if cfg.get("model_type", "bert") != "bert":
        raise TaskError(
            f"{where}: model_type {cfg.get('model_type')!r}; only BERT checkpoints "
            "can be imported onto this backbone"
        )
    for key, value in want.items():
        if key in cfg and int(cfg[key]) != value:
            raise TaskError(
                f"{where}: {key}={cfg[key]} but the serving backbone has {value}; "
                "the task was trained on another backbone. Serve it with that "
                "backbone (BACKBONE=...) or import onto --backbone of that shape"
            )


def _publish(store: Path | None, weights: BackboneWeights, res: ImportResult) -> ImportResult:
    validate_task(weights, res.manifest, res.tensors)  # raises before anything is written
    if store is not None:
        res.path = write_task(store, res.manifest, res.tensors)
    return res


# -------------------------------------------------------------------------------- PEFT
def read_peft(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the safetensors tensors of a PEFT adapter folder."""
    folder = Path(folder)
    cfg_path, st = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise TaskError(
            f"{folder} has no adapter_config.json; expected a PEFT adapter folder "
            "(PeftModel.save_pretrained)"
        )
    if not st.is_file():
        _refuse_pickle(folder, "adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise TaskError(f"{cfg_path} must hold a JSON object")
    return cfg, read_weights(st)


def convert_peft(
    weights: BackboneWeights,
    name: str,
    cfg: dict[str, Any],
    raw: dict[str, torch.Tensor],
    head: HeadConfig | None = None,
) -> ImportResult:
    """Map a PEFT adapter onto task tensors (no validation, nothing written)."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    importable = peft_types()
    if peft_type not in importable:
        raise TaskError(
            f"PEFT type {cfg.get('peft_type')!r} is not supported; importable types "
            f"are {' and '.join(sorted(importable))} (merge others into a full checkpoint "
            "and use `pets import-finetuned`)"
        )
    cls = importable[peft_type]
    cls.check_peft_config(cfg)  # before the tensors: the config says best what is wrong
    # A name in modules_to_save that matched no module of the trained model saved nothing
    # (PEFT >= 0.22 lists DistilBERT's `pre_classifier` for every SEQ_CLS/TOKEN_CLS model):
    # only names whose trained copies the file holds are refused.
    names = {key: _strip(key) for key in raw}  # BertModel-relative
    extra = {
        n
        for n in cfg.get("modules_to_save") or []
        if n not in ("classifier", "pooler", "pooler.dense", "score")
        and any(f".{n}." in f".{k}" for k in names.values())
    }
    if extra:
        raise TaskError(
            f"modules_to_save {sorted(extra)} are trained copies of backbone modules "
            "the engine shares between tasks; only 'classifier' and 'pooler' can be "
            "per-task. Retrain without them, or merge and use `pets import-finetuned`"
        )
    layer_re = _layer_re()
    markers = [c.peft_marker for c in importable.values()]
    tensors: dict[str, torch.Tensor] = {}
    warnings: list[str] = []
    modules: set[str] = set()
    pooler_pet: dict[str, torch.Tensor] = {}  # PET tensors on bert.pooler.dense
    for key, t in raw.items():
        k = names[key]
        if ".original_module." in k:
            continue  # the frozen copy PEFT keeps beside modules_to_save
        if k in (
            "classifier.weight",
            "classifier.bias",
            "pooler.dense.weight",
            "pooler.dense.bias",
        ):
            tensors[k] = t.float()
            continue
        if k.startswith("pooler.dense.") and any(mk in k for mk in markers):
            pooler_pet[k.removeprefix("pooler.dense.")] = t.float()
            continue
        m = layer_re.match(k)
        if m is None:
            what = (
                "a PET layer on a module outside the BERT linears"
                if any(marker in k for marker in markers)
                else "a trained copy of a backbone module"
            )
            raise TaskError(
                f"adapter tensor {key!r} is {what}; the engine serves "
                f"{'/'.join(sorted(importable))} on the BERT linears {sorted(MODULES)} plus "
                "a classifier/pooler from modules_to_save. Retrain without it, or merge and "
                "use `pets import-finetuned`"
            )
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULES:
            raise TaskError(
                f"adapter tensor {key!r} adapts {module!r}, which is not a BERT "
                f"linear of the shared backbone ({sorted(MODULES)}); the engine runs "
                "PET work only at those sites"
            )
        if layer >= weights.spec.layers:
            raise TaskError(
                f"adapter tensor {key!r} is for layer {layer}, but the backbone has "
                f"{weights.spec.layers} layers; it was made for another backbone"
            )
        if kind not in cls.peft_suffixes:
            raise TaskError(f"adapter tensor {key!r} does not belong to a {peft_type} adapter")
        modules.add(module)
        tensors[layer_key(layer, module, kind)] = t.float()
    if not modules:
        raise TaskError(
            f"the {peft_type} adapter has no tensors on BERT linears; keys seen: {sorted(raw)[:5]}"
        )
    hparams = cls.peft_hparams(cfg, tensors, sorted(modules))
    pet = cls.name
    the_head = _head(tensors, head, source_head_kind(cfg))
    if pooler_pet:
        if the_head.kind not in POOLED_KINDS:
            warnings.append(
                f"the {peft_type} adapter also adapts bert.pooler.dense, which only pooled "
                f"heads ({', '.join(POOLED_KINDS)}) use; the task has a {the_head.kind} head, "
                "so it is dropped"
            )
        elif "pooler.dense.weight" in tensors:
            raise TaskError(
                "the adapter both trains a copy of the pooler (modules_to_save) and adapts "
                "bert.pooler.dense; PEFT never produces both. Re-save the adapter"
            )
        else:
            tensors.update(_merge_pooler(weights, peft_type, hparams, pooler_pet))
    manifest = TaskManifest(
        name=check_name(name),
        pet_type=pet,
        hparams=hparams,
        head=the_head,
        backbone_fingerprint=weights.spec.fingerprint,
        created=time.time(),
    )
    return ImportResult(manifest, tensors, warnings)


def _merge_pooler(
    weights: BackboneWeights,
    peft_type: str,
    hparams: dict[str, Any],
    pet_t: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The task's own ``pooler.dense.{weight,bias}``: the backbone's pooler with the
    adapter's PET on ``bert.pooler.dense`` merged in (``pet_t`` keyed without the module,
    e.g. ``lora_A.weight``). The pooler runs once per sequence, so merging costs nothing at
    serving time and the per-task pooler (heads.py) already exists.

    LoRA: ``W + scale * B @ A`` (``scale`` as the task's other sites). IA3 (PEFT's ``Linear``):
    an ``[H, 1]`` vector scales the output, ``(W x + b) * l`` -> ``l[:, None] * W``, ``l * b``;
    a ``[1, H]`` (feedforward) vector scales the input, ``W (x * l) + b`` -> ``W * l``, ``b``.
    """
    if weights.pooler_w is None or weights.pooler_b is None:
        raise TaskError(
            "the adapter adapts bert.pooler.dense, but the serving backbone has no pooler; "
            "retrain with exclude_modules=['pooler.dense']"
        )
    w, b = weights.pooler_w.float().clone(), weights.pooler_b.float().clone()
    h = w.shape[0]
    if peft_type == "LORA":
        a, bm = pet_t.get("lora_A.weight"), pet_t.get("lora_B.weight")
        if a is None or bm is None or set(pet_t) != {"lora_A.weight", "lora_B.weight"}:
            raise TaskError(
                f"bert.pooler.dense carries LoRA tensors {sorted(pet_t)}; expected exactly "
                "lora_A.weight and lora_B.weight"
            )
        r = int(hparams["r"])
        if tuple(a.shape) != (r, h) or tuple(bm.shape) != (h, r):
            raise TaskError(
                f"bert.pooler.dense LoRA tensors have shapes {tuple(a.shape)} and "
                f"{tuple(bm.shape)}; expected ({r}, {h}) and ({h}, {r})"
            )
        from .pet.lora import LoraConfig

        w = w + LoraConfig.from_hparams(hparams).scale * (bm.double() @ a.double()).float()
    elif peft_type == "IA3":
        lvec = pet_t.get("ia3_l")
        if lvec is None or set(pet_t) != {"ia3_l"}:
            raise TaskError(
                f"bert.pooler.dense carries IA3 tensors {sorted(pet_t)}; expected ia3_l"
            )
        if tuple(lvec.shape) == (h, 1):
            w, b = w * lvec, b * lvec.reshape(-1)
        elif tuple(lvec.shape) == (1, h):
            w = w * lvec
        else:
            raise TaskError(
                f"bert.pooler.dense ia3_l has shape {tuple(lvec.shape)}; expected ({h}, 1) "
                f"or (1, {h})"
            )
    else:
        raise TaskError(f"a {peft_type} adapter on bert.pooler.dense cannot be merged")
    return {"pooler.dense.weight": w, "pooler.dense.bias": b}


def import_peft(
    store: Path | None,
    name: str,
    adapter_dir: Path,
    weights: BackboneWeights,
    head: HeadConfig | None = None,
) -> ImportResult:
    """Import a PEFT adapter folder as task ``name`` (validated, then published to ``store``)."""
    cfg, raw = read_peft(Path(adapter_dir))
    return _publish(store, weights, convert_peft(weights, name, cfg, raw, head))


# -------------------------------------------------------------------------------- fine-tuned
def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the state (``bert.`` prefix dropped) of an HF checkpoint folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TaskError(
            f"{folder} has no config.json; expected an HF checkpoint folder (save_pretrained)"
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        _refuse_pickle(folder, "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in read_weights(f).items():
            state[k.removeprefix("bert.")] = v
    return json.loads((folder / "config.json").read_text()), state


def convert_finetuned(
    weights: BackboneWeights,
    name: str,
    cfg: dict[str, Any],
    state: dict[str, torch.Tensor],
    pet: str,
    density: float = 0.01,
    head: HeadConfig | None = None,
) -> ImportResult:
    """Turn a fine-tuned state into a task of type ``pet`` (nothing written)."""
    if pet not in finetuned_types():
        raise TaskError(
            f"--as {pet!r}; a fine-tuned checkpoint imports as one of {list(finetuned_types())}"
        )
    if not (0.0 < density <= 1.0) or not math.isfinite(density):
        raise TaskError(f"--density {density}; expected a fraction in (0, 1]")
    base = state_from_weights(weights)
    missing = [k for k in base if k not in state and not k.startswith("pooler.")]
    if missing:
        raise TaskError(
            f"the checkpoint lacks {len(missing)} backbone tensors (e.g. "
            f"{missing[0]!r}); expected a BertModel / BertForSequenceClassification "
            "of the serving backbone's shape"
        )
    for k, v in base.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise TaskError(
                f"checkpoint tensor {k!r} has shape {tuple(state[k].shape)}, the "
                f"backbone's has {tuple(v.shape)}; it was fine-tuned from another "
                "backbone"
            )
    tensors: dict[str, torch.Tensor] = {}
    for k in base:
        if k.startswith("pooler.") or not (k.endswith(".bias") or "LayerNorm" in k):
            continue
        tensors[k] = state[k].float().clone()
    deltas = (
        (i, module, state[key].float() - base[key].float())
        for i in range(weights.spec.layers)
        for module in MODULES
        for key in (layer_key(i, module, "weight"),)
    )
    hparams, weight_tensors, warnings = pet_types()[pet].from_weight_deltas(deltas, density)
    tensors.update(weight_tensors)
    for k in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
    ):
        diff = float((state[k].float() - base[k].float()).abs().max())
        if diff > 0:
            warnings.append(
                f"{k} differs from the backbone by up to {diff:.3g}; embeddings are "
                "shared by all tasks, so this change is dropped"
            )
    for k in ("classifier.weight", "classifier.bias"):
        if k in state:
            tensors[k] = state[k].float()
    the_head = _head(tensors, head, source_head_kind(cfg))
    pooled = the_head.kind in POOLED_KINDS
    if pooled and "pooler.dense.weight" in state:
        tensors["pooler.dense.weight"] = state["pooler.dense.weight"].float()
        tensors["pooler.dense.bias"] = state["pooler.dense.bias"].float()
    elif pooled:
        warnings.append("the checkpoint has no pooler; the backbone's pooler is used")
    extra = sorted(
        k for k in state if k not in base and not k.startswith(("classifier.", "pooler."))
    )
    extra = [k for k in extra if "position_ids" not in k]
    if extra:
        raise TaskError(
            f"the checkpoint has {len(extra)} tensors a BERT task cannot carry "
            f"(e.g. {extra[0]!r}); expected BertModel / BertForSequenceClassification"
        )
    if cfg.get("architectures"):
        hparams["source_architecture"] = cfg["architectures"][0]
    manifest = TaskManifest(
        name=check_name(name),
        pet_type=pet,
        hparams=hparams,
        head=the_head,
        backbone_fingerprint=weights.spec.fingerprint,
        created=time.time(),
    )
    return ImportResult(manifest, tensors, warnings)


def import_finetuned(
    store: Path | None,
    name: str,
    checkpoint_dir: Path,
    weights: BackboneWeights,
    pet: str = "diff_pruning",
    density: float = 0.01,
    head: HeadConfig | None = None,
) -> ImportResult:
    """Import a full fine-tuned checkpoint as task ``name`` (validated, then published)."""
    folder = Path(checkpoint_dir)
    cfg, state = read_checkpoint(folder)
    _check_spec(weights, cfg, folder)
    return _publish(
        store, weights, convert_finetuned(weights, name, cfg, state, pet, density, head)
    )
