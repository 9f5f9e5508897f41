"""The baselines a user would run instead of pets: one full model per task, and HF PEFT.

* :func:`task_model`: one task as a complete model of its own, an HF ``BertModel`` plus the
  task's head. The task's weights are merged into a copy of the backbone where the PET type
  allows it (:data:`MERGERS`): LoRA (``W + s B A``), IA3 (rows or columns of ``W`` and the
  bias scaled), BitFit (the task's biases and LayerNorms), Diff-Pruning (``W + delta``),
  MaskBERT (``W * M``). Adapters cannot be merged: their bottleneck MLP runs as a forward
  hook after each adapted output dense (the HF model a user would write). So a merged model
  costs exactly the bare backbone; pets' shared batch is measured against that.
* :class:`SeqS` / :class:`ParS`: the PetS paper's two serving baselines over such models.
  SeqS runs the task models one after another; ParS runs them concurrently, each on a CUDA
  stream of its own (on a CPU: one thread per model, since torch ops release the GIL).
* :class:`PeftMixedBatch`: HF PEFT's own multi-adapter inference, one ``PeftModel`` holding
  every LoRA task as a named adapter and one forward with ``adapter_names=`` per row.

Merging reads the task format through the project's own definitions (``pets.pet.*`` configs,
:func:`pets.backbone.state_from_weights`, :func:`pets.pet.maskbert.unpack_mask`), so a merged
model equals the engine's output for the task (``tests/test_paper.py`` checks it at 1e-4).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from petops.reference import activation
from pets.backbone import BackboneWeights, hf_config, state_from_weights
from pets.heads import HeadConfig
from pets.pet.adapter import AdapterConfig
from pets.pet.common import MODULES, module_shape
from pets.pet.ia3 import Ia3Config
from pets.pet.lora import LoraConfig
from pets.pet.maskbert import unpack_mask
from pets.taskstore import TaskManifest

if TYPE_CHECKING:  # imported where a model is built: the harness's other experiments run
    # without transformers (e.g. where its numpy needs differ from Triton's stub, docs/paper.md)
    from transformers import BertModel

Tensors = Mapping[str, torch.Tensor]
State = dict[str, torch.Tensor]
# (backbone state dict, fp32 and HF-named; the task's manifest and tensors) -> changed entries
Merger = Callable[[State, TaskManifest, Tensors, BackboneWeights], State]


def _w(layer: int, module: str) -> str:
    return f"encoder.layer.{layer}.{module}.weight"


def _bias_ln(state: State, tensors: Tensors) -> State:
    """The biases and LayerNorms a task carries (full values) replace the backbone's."""
    return {
        k: v.float()
        for k, v in tensors.items()
        if k in state and not k.startswith("pooler.") and (k.endswith(".bias") or "LayerNorm" in k)
    }


def merge_none(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    return {}


def merge_bitfit(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    return _bias_ln(state, t)


def merge_lora(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    """``W + s * B @ A`` for every adapted module; ``s`` as the engine reads it."""
    scale = LoraConfig.from_hparams(m.hparams).scale
    out: State = {}
    for i in range(w.spec.layers):
        for mod in MODULES:
            a = t.get(f"encoder.layer.{i}.{mod}.lora_A.weight")
            if a is not None:
                b = t[f"encoder.layer.{i}.{mod}.lora_B.weight"]
                out[_w(i, mod)] = state[_w(i, mod)] + scale * (b.float() @ a.float())
    return out


def merge_ia3(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    """PEFT's IA3 folded into the weights: a feed-forward module scales its *input*
    (columns of ``W``), any other its *output* (rows of ``W`` and the bias)."""
    ff = set(Ia3Config.from_hparams(m.hparams).feedforward_modules)
    out: State = {}
    for i in range(w.spec.layers):
        for mod in MODULES:
            scale = t.get(f"encoder.layer.{i}.{mod}.ia3_l")
            if scale is None:
                continue
            s = scale.float().reshape(-1)
            if mod in ff:
                out[_w(i, mod)] = state[_w(i, mod)] * s[None, :]
            else:
                bias = f"encoder.layer.{i}.{mod}.bias"
                out[_w(i, mod)] = state[_w(i, mod)] * s[:, None]
                out[bias] = state[bias] * s
    return out


def merge_diff_pruning(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    """``W + delta`` (the sparse delta scattered into the dense weight), own biases/LNs."""
    out = _bias_ln(state, t)
    for i in range(w.spec.layers):
        for mod in MODULES:
            idx = t.get(f"encoder.layer.{i}.{mod}.weight_delta_indices")
            if idx is not None:
                vals = t[f"encoder.layer.{i}.{mod}.weight_delta_values"].float()
                flat = state[_w(i, mod)].reshape(-1).clone()
                flat[idx.long()] += vals
                out[_w(i, mod)] = flat.view(module_shape(w.spec, mod))
    return out


def merge_maskbert(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    """``W * M`` with the task's unpacked keep-mask."""
    out: State = {}
    for i in range(w.spec.layers):
        for mod in MODULES:
            bits = t.get(f"encoder.layer.{i}.{mod}.weight_mask")
            if bits is not None:
                keep = unpack_mask(bits, module_shape(w.spec, mod)).to(torch.float32)
                out[_w(i, mod)] = state[_w(i, mod)] * keep
    return out


def merge_adapter(state: State, m: TaskManifest, t: Tensors, w: BackboneWeights) -> State:
    """Only the biases and LayerNorms merge; the bottleneck runs as hooks
    (:func:`_hook_adapters`)."""
    return _bias_ln(state, t)


MERGERS: dict[str, Merger] = {
    "none": merge_none,
    "bitfit": merge_bitfit,
    "lora": merge_lora,
    "ia3": merge_ia3,
    "diff_pruning": merge_diff_pruning,
    "maskbert": merge_maskbert,
    "adapter": merge_adapter,
}


def _hook_adapters(bert: BertModel, manifest: TaskManifest, tensors: Tensors) -> int:
    """Houlsby adapters, ``h + up(act(down(h)))`` after each adapted output dense, as
    modules (so ``.to(device, dtype)`` moves them). Returns how many sites were hooked."""
    act = activation(AdapterConfig.from_hparams(manifest.hparams).activation)
    hooked = 0
    layers: Any = bert.encoder.layer
    for i, layer in enumerate(layers):
        for module, dense in (
            ("attention.output", layer.attention.output.dense),
            ("output", layer.output.dense),
        ):
            p = f"encoder.layer.{i}.{module}.adapter."
            if p + "down.weight" not in tensors:
                continue
            down_w = tensors[p + "down.weight"].float()
            down = nn.Linear(down_w.shape[1], down_w.shape[0])
            up_w = tensors[p + "up.weight"].float()
            up = nn.Linear(up_w.shape[1], up_w.shape[0])
            with torch.no_grad():
                down.weight.copy_(down_w)
                down.bias.copy_(tensors[p + "down.bias"].float())
                up.weight.copy_(up_w)
                up.bias.copy_(tensors[p + "up.bias"].float())
            dense.add_module("adapter_down", down)
            dense.add_module("adapter_up", up)

            def hook(mod: Any, _inp: object, out: torch.Tensor) -> torch.Tensor:
                return out + mod.adapter_up(act(mod.adapter_down(out)))

            dense.register_forward_hook(hook)
            hooked += 1
    return hooked


class TaskModel(nn.Module):
    """One task as its own model: a BERT with the task's PET applied, then its head."""

    def __init__(self, bert: BertModel, head: HeadConfig, tensors: Tensors) -> None:
        super().__init__()
        self.bert, self.head = bert, head
        self.classifier: nn.Linear | None = None
        if head.kind == "classification":
            cw = tensors["classifier.weight"].float()
            self.classifier = nn.Linear(cw.shape[1], cw.shape[0])
            with torch.no_grad():
                self.classifier.weight.copy_(cw)
                self.classifier.bias.copy_(tensors["classifier.bias"].float())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``/``attention_mask`` ``[B, L]`` -> head outputs ``[B, D]`` (float32)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        if self.classifier is not None:
            return self.classifier(out.pooler_output).float()
        hidden = out.last_hidden_state
        if self.head.pooling == "mean":
            m = attention_mask[..., None].to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1)
        else:
            emb = hidden[:, 0]
        emb = emb.float()
        return F.normalize(emb, dim=-1) if self.head.normalize else emb


def backbone_model(w: BackboneWeights) -> BertModel:
    """The bare backbone as an HF ``BertModel`` (fp32, CPU, eval)."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**hf_config(w.spec)), add_pooling_layer=True)
    state = state_from_weights(w)
    if w.pooler_w is None:  # a checkpoint without a pooler: classification needs one
        raise ValueError(
            f"backbone {w.spec.fingerprint} has no pooler; the SeqS baseline needs "
            "pooler.dense.* for classification heads (every synthetic config has one)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise ValueError(f"backbone state does not fit BertModel: {missing=} {unexpected=}")
    return model.eval()


def task_model(
    w: BackboneWeights,
    manifest: TaskManifest,
    tensors: Tensors,
    *,
    base: BertModel | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TaskModel:
    """One task as a full model (a copy of ``base``, default :func:`backbone_model`).

    Raises:
        KeyError: no merger for the task's PET type (add one to :data:`MERGERS`).
    """
    if manifest.pet_type not in MERGERS:
        raise KeyError(
            f"no SeqS merger for PET type {manifest.pet_type!r}; known: {sorted(MERGERS)}. "
            "Add one to MERGERS in clients/paper/baselines.py"
        )
    bert = copy.deepcopy(base if base is not None else backbone_model(w))
    state = {k: v.float() for k, v in bert.state_dict().items()}
    changes = MERGERS[manifest.pet_type](state, manifest, tensors, w)
    if "pooler.dense.weight" in tensors:
        changes["pooler.dense.weight"] = tensors["pooler.dense.weight"].float()
        changes["pooler.dense.bias"] = tensors["pooler.dense.bias"].float()
    _, unexpected = bert.load_state_dict(changes, strict=False)
    if unexpected:
        raise ValueError(f"merged names not in BertModel: {unexpected[:5]}")
    if manifest.pet_type == "adapter" and not _hook_adapters(bert, manifest, tensors):
        raise ValueError(f"adapter task {manifest.name!r} carries no adapter tensors")
    return TaskModel(bert, manifest.head, tensors).to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SeqS:
    """The PetS paper's SeqS: every task model runs its own input, one after another."""

    name = "seqs"

    def __init__(self, models: Sequence[TaskModel], device: torch.device) -> None:
        self.models, self.device = list(models), device

    def __call__(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """One round: model ``k`` on ``inputs[k]`` (``ids``, ``mask``, ``[bs, L]`` each)."""
        return [m(ids, mask) for m, (ids, mask) in zip(self.models, inputs, strict=True)]


class ParS:
    """The PetS paper's ParS: the task models run concurrently, one CUDA stream each (one
    thread each on a CPU). :attr:`mode` says which."""

    name = "pars"

    def __init__(self, models: Sequence[TaskModel], device: torch.device) -> None:
        self.models, self.device = list(models), device
        self.mode = "cuda-streams" if device.type == "cuda" else "threads"
        if device.type == "cuda":
            self.streams = [torch.cuda.Stream(device) for _ in self.models]
        else:
            self.pool = ThreadPoolExecutor(max_workers=len(self.models))
            self._lock = threading.Lock()

    def __call__(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            futures = [
                self.pool.submit(m, ids, mask)
                for m, (ids, mask) in zip(self.models, inputs, strict=True)
            ]
            return [f.result() for f in futures]
        main = torch.cuda.current_stream(self.device)
        outs = []
        for m, s, (ids, mask) in zip(self.models, self.streams, inputs, strict=True):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                outs.append(m(ids, mask))
        for s in self.streams:
            main.wait_stream(s)
        return outs

    def close(self) -> None:
        if self.device.type != "cuda":
            self.pool.shutdown()


class PeftMixedBatch:
    """HF PEFT's mixed-adapter batch: one ``PeftModel`` holding every LoRA task as a named
    adapter; one forward of all rows with ``adapter_names=[task of each row]``. PEFT runs
    each LoRA layer once per distinct adapter in the batch (its sub-batch), the reference
    library behaviour a LoRA server is compared with. It returns the pooled output; the
    per-task classifiers (one small GEMM each) are left out, in PEFT's favour."""

    name = "peft_mixed"

    def __init__(
        self,
        w: BackboneWeights,
        tasks: Sequence[tuple[TaskManifest, Tensors]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        self.device = device
        self.names = [m.name for m, _ in tasks]
        bad = [m.name for m, _ in tasks if m.pet_type != "lora"]
        if bad:
            raise ValueError(f"PEFT's mixed batch serves LoRA tasks only; not LoRA: {bad[:5]}")
        base = backbone_model(w)
        peft_model = None
        for manifest, tensors in tasks:
            cfg_ours = LoraConfig.from_hparams(manifest.hparams)
            mods = sorted(
                {k.split(".", 3)[3].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k}
            )
            cfg = PeftLoraConfig(
                r=int(manifest.hparams["r"]),
                lora_alpha=cfg_ours.lora_alpha,  # type: ignore[arg-type]  # PEFT takes floats
                use_rslora=cfg_ours.use_rslora,
                target_modules=mods,
                lora_dropout=0.0,
                init_lora_weights=False,
            )
            if peft_model is None:
                peft_model = get_peft_model(base, cfg, adapter_name=manifest.name)
            else:
                peft_model.add_adapter(manifest.name, cfg)
        assert peft_model is not None, "at least one task"
        sd = peft_model.state_dict()
        for manifest, tensors in tasks:
            for k, v in tensors.items():
                if ".lora_" in k:
                    tail = k.replace(".weight", f".{manifest.name}.weight")
                    key = next(n for n in sd if n.endswith(tail))
                    sd[key] = v.float()
        peft_model.load_state_dict(sd)
        self.model = peft_model.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, adapter_names: Sequence[str]
    ) -> torch.Tensor:
        """One mixed batch: ``ids``/``mask`` ``[B, L]``, row ``b`` through adapter
        ``adapter_names[b]``. Returns the pooled output ``[B, H]``."""
        out = self.model(input_ids=ids, attention_mask=mask, adapter_names=list(adapter_names))
        return out.pooler_output
