"""Export one task (backbone + PET + head) as a standalone ONNX model (``pets export-onnx``).

The task is first folded into plain BERT weights (:func:`merge_task`), per PET type:

==============  ==========================================================================
type            folded as
==============  ==========================================================================
none            the backbone as it is
bitfit          the task's biases and LayerNorms replace the backbone's
diff_pruning    ``W + delta`` (the sparse delta scattered), plus its BitFit tensors
maskbert        ``W * mask``
lora            ``W + s * B @ A`` (``s = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)
ia3             output scales: ``diag(l) W`` and ``l * b``; feedforward (input) scales
                ``W diag(l)``
adapter         not foldable: ``h + up(act(down(h)))`` nodes after each adapted output
                dense (Houlsby), plus its BitFit tensors
==============  ==========================================================================

A PET type not in :data:`MERGERS` is refused by name. :class:`TaskGraph` is then a plain
BERT forward over padded ``[B, L]`` batches (``input_ids``, ``attention_mask``, and
``token_type_ids`` for pair tasks), ending in the task's head; it is exported with
``torch.onnx.export``: by default its dynamo exporter (``torch.export`` + onnxscript,
torch's default and recommended path since 2.9; about 15 s for a small model on a busy
2-core machine), or with ``exporter="torchscript"`` the legacy TorchScript tracer (under
a second; deprecated upstream, kept for speed and older runtimes). It is checked with
``onnx.checker`` and, in ONNX Runtime, against the serving engine's own output for the
same task. Outputs, per head (``C`` labels, ``H`` hidden):

* pooled heads: ``logits`` (or ``probabilities``) ``[B, C]``;
* token_classification: ``logits`` (or ``probabilities``) ``[B, L, C]``, pad positions
  included (the caller drops them with its attention mask);
* embedding: ``embedding`` ``[B, H]``.

:func:`triton_config` writes the ``config.pbtxt`` for Triton's ``onnxruntime`` backend.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from petops.reference import ACTIVATIONS, activation

from .backbone import BackboneWeights, state_from_weights
from .errors import PetsError, TaskError
from .heads import POOLED_KINDS, HeadConfig
from .pet.adapter import AdapterConfig
from .pet.common import MODULES, layer_key, module_shape
from .pet.ia3 import Ia3Config
from .pet.lora import LoraConfig
from .pet.maskbert import unpack_mask
from .taskstore import TaskManifest
from .validate import validate_task

FP32_TOL = 1e-4  # max-abs, ONNX Runtime vs the engine, fp32 (the bar)
FP16_TOL = 2e-2  # fp16 graph vs the fp32 engine
ADAPTER_SITES = ("attention.output", "output")
EXPORTERS = ("dynamo", "torchscript")


class ExportError(PetsError):
    """The task cannot be exported, or the export does not match the engine."""


@dataclass
class MergedTask:
    """A task folded into plain BERT weights (HF ``BertModel`` names, no ``bert.`` prefix)
    plus what cannot be folded (adapters) and its head."""

    state: dict[str, torch.Tensor]
    head: HeadConfig
    head_tensors: dict[str, torch.Tensor]
    adapters: dict[tuple[int, str], tuple[torch.Tensor, ...]] = field(default_factory=dict)
    adapter_act: str = "relu"


Merger = Callable[[MergedTask, TaskManifest, dict[str, torch.Tensor], BackboneWeights], None]


def _weight(m: MergedTask, layer: int, module: str) -> str:
    return layer_key(layer, module, "weight")


def _modules(tensors: dict[str, torch.Tensor], suffix: str, layers: int):
    """``(layer, module, tensor)`` of every ``encoder.layer.{i}.{module}.{suffix}`` present."""
    for i in range(layers):
        for mod in MODULES:
            key = layer_key(i, mod, suffix)
            if key in tensors:
                yield i, mod, tensors[key].float()


def _merge_none(m: MergedTask, man: TaskManifest, t: dict, w: BackboneWeights) -> None:
    return None


def _merge_diff_pruning(m: MergedTask, man: TaskManifest, t: dict, w: BackboneWeights) -> None:
    for i, mod, idx in _modules(t, "weight_delta_indices", w.spec.layers):
        vals = t[layer_key(i, mod, "weight_delta_values")].float()
        key = _weight(m, i, mod)
        flat = m.state[key].reshape(-1).clone()
        flat[idx.long()] += vals
        m.state[key] = flat.view(module_shape(w.spec, mod))


def _merge_maskbert(m: MergedTask, man: TaskManifest, t: dict, w: BackboneWeights) -> None:
    for i in range(w.spec.layers):
        for mod in MODULES:
            bits = t.get(layer_key(i, mod, "weight_mask"))
            if bits is not None:
                key = _weight(m, i, mod)
                m.state[key] = m.state[key] * unpack_mask(bits, module_shape(w.spec, mod))


def _merge_lora(m: MergedTask, man: TaskManifest, t: dict, w: BackboneWeights) -> None:
    scale = LoraConfig.from_hparams(man.hparams).scale
    for i, mod, a in _modules(t, "lora_A.weight", w.spec.layers):
        b = t[layer_key(i, mod, "lora_B.weight")].float()
        key = _weight(m, i, mod)
        m.state[key] = m.state[key] + scale * (b @ a)


def _merge_ia3(m: MergedTask, man: TaskManifest, t: dict, w: BackboneWeights) -> None:
    ff = set(Ia3Config.from_hparams(man.hparams).feedforward_modules)
    for i, mod, scale in _modules(t, "ia3_l", w.spec.layers):
        key = _weight(m, i, mod)
        scale = scale.reshape(-1)
        if mod in ff:  # PEFT scales a feedforward module's input: W diag(l)
            m.state[key] = m.state[key] * scale[None, :]
        else:  # its output, bias included: diag(l) W, l * b
            bias = layer_key(i, mod, "bias")
            m.state[key] = m.state[key] * scale[:, None]
            m.state[bias] = m.state[bias] * scale


def _merge_adapter(m: MergedTask, man: TaskManifest, t: dict, w: BackboneWeights) -> None:
    m.adapter_act = AdapterConfig.from_hparams(man.hparams).activation
    for i in range(w.spec.layers):
        for site in ADAPTER_SITES:
            p = f"encoder.layer.{i}.{site}.adapter."
            if p + "down.weight" in t:
                m.adapters[(i, site)] = tuple(
                    t[p + n].float() for n in ("down.weight", "down.bias", "up.weight", "up.bias")
                )


MERGERS: dict[str, Merger] = {
    "none": _merge_none,
    "bitfit": _merge_none,  # biases and LayerNorms only: done for every type below
    "diff_pruning": _merge_diff_pruning,
    "maskbert": _merge_maskbert,
    "lora": _merge_lora,
    "ia3": _merge_ia3,
    "adapter": _merge_adapter,
}
"""PET type -> how its tensors fold into (or, adapters, sit beside) the BERT weights."""


def merge_task(
    w: BackboneWeights, manifest: TaskManifest, tensors: dict[str, torch.Tensor]
) -> MergedTask:
    """Fold a (validated) task into plain BERT weights.

    Raises:
        ExportError: the PET type has no entry in :data:`MERGERS`.
    """
    merger = MERGERS.get(manifest.pet_type)
    if merger is None:
        raise ExportError(
            f"task {manifest.name!r}: PET type {manifest.pet_type!r} cannot be exported to "
            f"ONNX; exportable types are {sorted(MERGERS)}"
        )
    state = {k: v.float().clone() for k, v in state_from_weights(w).items()}
    head_t = {k: v for k, v in tensors.items() if k.startswith(("classifier.", "pooler."))}
    m = MergedTask(state, manifest.head, {k: v.float() for k, v in head_t.items()})
    for k, v in tensors.items():  # BitFit tensors (any type may carry them): full values
        if k in state and (k.endswith(".bias") or "LayerNorm" in k) and not k.startswith("pooler"):
            state[k] = v.float().clone()
    merger(m, manifest, tensors, w)
    return m


class TaskGraph(nn.Module):
    """BERT + the task's head over padded batches, in plain torch ops (exportable).

    ``forward(input_ids [B, L] int64, attention_mask [B, L] int64[, token_type_ids [B, L]])``
    returns the head's output (see the module docstring).
    """

    def __init__(self, m: MergedTask, w: BackboneWeights, pairs: bool) -> None:
        super().__init__()
        spec = w.spec
        if spec.act not in ACTIVATIONS or m.adapter_act not in ACTIVATIONS:
            raise ExportError(f"activation {spec.act!r}/{m.adapter_act!r} cannot be exported")
        self.spec, self.head, self.pairs = spec, m.head, pairs
        self.act, self.adapter_act = activation(spec.act), activation(m.adapter_act)
        self.adapter_keys = sorted(m.adapters)
        s = m.state
        params = dict(s)
        for (i, site), ts in m.adapters.items():
            for n, t in zip(("dw", "db", "uw", "ub"), ts, strict=True):
                params[f"adapter.{i}.{site}.{n}"] = t
        if m.head.kind in POOLED_KINDS:
            pw = m.head_tensors.get("pooler.dense.weight", s.get("pooler.dense.weight"))
            pb = m.head_tensors.get("pooler.dense.bias", s.get("pooler.dense.bias"))
            h = spec.hidden  # no pooler anywhere: the engine's zero pooler, tanh(0) = 0
            params["pooler.dense.weight"] = pw if pw is not None else torch.zeros(h, h)
            params["pooler.dense.bias"] = pb if pb is not None else torch.zeros(h)
        if m.head.has_classifier:
            params["classifier.weight"] = m.head_tensors["classifier.weight"]
            params["classifier.bias"] = m.head_tensors["classifier.bias"]
        self.names = {k: f"p{i}" for i, k in enumerate(sorted(params))}
        for k, v in params.items():
            self.register_buffer(self.names[k], v.contiguous(), persistent=True)

    def _p(self, name: str) -> torch.Tensor:
        t = getattr(self, self.names[name])
        assert isinstance(t, torch.Tensor)
        return t

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self._p(prefix + ".weight"), self._p(prefix + ".bias"))

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(
            x, (self.spec.hidden,), self._p(prefix + ".weight"), self._p(prefix + ".bias"),
            self.spec.eps,
        )  # fmt: skip

    def _adapter(self, y: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        if (layer, site) not in self.adapter_keys:
            return y
        p = f"adapter.{layer}.{site}."
        down = F.linear(y, self._p(p + "dw"), self._p(p + "db"))
        return y + F.linear(self.adapter_act(down), self._p(p + "uw"), self._p(p + "ub"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        spec = self.spec
        b, length = input_ids.shape
        nh, hd = spec.heads, spec.head_dim
        pos = torch.arange(length, device=input_ids.device)
        emb = self._p("embeddings.word_embeddings.weight")[input_ids]
        emb = emb + self._p("embeddings.position_embeddings.weight")[pos][None]
        types = self._p("embeddings.token_type_embeddings.weight")
        emb = emb + (types[0][None, None] if token_type_ids is None else types[token_type_ids])
        x = self._ln(emb, "embeddings.LayerNorm")
        keep = attention_mask.to(x.dtype)  # [B, L]
        neg = (1.0 - keep)[:, None, None, :] * torch.finfo(x.dtype).min
        for i in range(spec.layers):
            p = f"encoder.layer.{i}."

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(b, length, nh, hd).transpose(1, 2)  # [B, nh, L, hd]

            q = heads(self._linear(x, p + "attention.self.query"))
            k = heads(self._linear(x, p + "attention.self.key"))
            v = heads(self._linear(x, p + "attention.self.value"))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd) + neg
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            ctx = ctx.transpose(1, 2).reshape(b, length, spec.hidden)
            a = self._adapter(
                self._linear(ctx, p + "attention.output.dense"), i, "attention.output"
            )
            h = self._ln(a + x, p + "attention.output.LayerNorm")
            f = self.act(self._linear(h, p + "intermediate.dense"))
            o = self._adapter(self._linear(f, p + "output.dense"), i, "output")
            x = self._ln(o + h, p + "output.LayerNorm")
        return self._head(x, keep)

    def _head(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        head = self.head
        if head.kind == "embedding":
            if head.pooling == "mean":
                emb = (x * keep[:, :, None]).sum(1) / keep.sum(1, keepdim=True)
            else:
                emb = x[:, 0]
            return F.normalize(emb, dim=-1) if head.normalize else emb
        if head.kind == "token_classification":
            logits = self._linear(x, "classifier")  # [B, L, C]
        else:
            pooled = torch.tanh(self._linear(x[:, 0], "pooler.dense"))
            logits = self._linear(pooled, "classifier")  # [B, C]
        if head.output != "probabilities":
            return logits
        return torch.sigmoid(logits) if head.kind == "multi_label" else logits.softmax(-1)


def output_name(head: HeadConfig) -> str:
    if head.kind == "embedding":
        return "embedding"
    return "probabilities" if head.output == "probabilities" else "logits"


def input_names(pairs: bool) -> list[str]:
    return ["input_ids", "attention_mask", *(["token_type_ids"] if pairs else [])]


def sample_inputs(
    vocab: int, batch: int, length: int, pairs: bool, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Padded example inputs: row ``j`` has ``length - j`` real tokens (at least 2);
    pair rows switch to token type 1 halfway."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, max(vocab, 1001), size=(batch, length), dtype=np.int64)
    lens = np.maximum(length - np.arange(batch), 2)
    mask = (np.arange(length)[None, :] < lens[:, None]).astype(np.int64)
    ids[:, 0] = min(101, vocab - 1)
    ids = ids * mask
    out: tuple[np.ndarray, ...] = (ids, mask)
    if pairs:
        types = ((np.arange(length)[None, :] >= (lens // 2)[:, None]) & (mask > 0)).astype(np.int64)
        out = (*out, types)
    return out


@dataclass
class ExportReport:
    path: Path
    config_path: Path | None
    max_abs: float  # ONNX Runtime vs the engine, real tokens only
    tolerance: float
    opset: int
    dtype: str


def export_task(
    w: BackboneWeights,
    backbone: str,
    manifest: TaskManifest,
    tensors: dict[str, torch.Tensor],
    out: Path,
    *,
    opset: int = 18,
    dtype: str = "fp32",
    dynamic: bool = True,
    batch: int = 2,
    seq_len: int = 16,
    pairs: bool | None = None,
    write_config: bool = True,
    check: bool = True,
    exporter: str = "dynamo",
) -> ExportReport:
    """Export ``manifest``'s task to ``out`` and check it (see the module docstring).

    Args:
        w: the serving backbone (fp32, CPU); ``backbone`` its BACKBONE name (for the check).
        dynamic: batch and sequence axes dynamic; else fixed at ``[batch, seq_len]``.
        pairs: add ``token_type_ids``; default the head's ``pairs`` flag.
        check: compare ONNX Runtime with the engine on sample batches (and raise
            :class:`ExportError` past the tolerance).
        exporter: ``"dynamo"`` (default) or ``"torchscript"`` (see the module docstring).
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r}; expected one of {list(EXPORTERS)}")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"--dtype {dtype!r}; expected fp32 or fp16")
    if not 7 <= opset <= 23:
        raise ExportError(f"--opset {opset}; use an ONNX opset in [7, 23] (default 18)")
    try:
        validate_task(w, manifest, tensors)
    except TaskError as exc:
        raise ExportError(f"task {manifest.name!r} is not valid here: {exc}") from None
    pairs = manifest.head.pairs if pairs is None else pairs
    model = TaskGraph(merge_task(w, manifest, tensors), w, pairs).eval()
    if dtype == "fp16":
        model = model.half()
    names = input_names(pairs)
    example = tuple(torch.from_numpy(a) for a in sample_inputs(w.spec.vocab, batch, seq_len, pairs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outs = [output_name(manifest.head)]
    with torch.no_grad():
        if exporter == "dynamo":
            dims = None
            if dynamic:
                bdim, ldim = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)
                dims = {n: {0: bdim, 1: ldim} for n in names}
            torch.onnx.export(model, example, str(out), opset_version=opset, dynamic_shapes=dims,
                              external_data=False, dynamo=True, input_names=names,
                              output_names=outs)  # fmt: skip
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in names} if dynamic else None
            torch.onnx.export(model, example, str(out), opset_version=opset, dynamic_axes=axes,
                              dynamo=False, input_names=names, output_names=outs)  # fmt: skip
    import onnx

    onnx.checker.check_model(str(out), full_check=True)
    max_abs = 0.0
    tol = FP32_TOL if dtype == "fp32" else FP16_TOL
    if check:
        shapes = [(batch, seq_len)] + ([(3, 7), (1, 5)] if dynamic else [])
        max_abs = check_against_engine(out, backbone, manifest, tensors, shapes, pairs)
        if not max_abs <= tol:
            raise ExportError(
                f"{out}: ONNX Runtime differs from the engine by {max_abs:.3g} (max-abs), over "
                f"the {dtype} tolerance {tol:g}; the export is wrong, please report it"
            )
    config = None
    if write_config:
        config = write_triton_config(out, manifest, w, pairs, dtype, dynamic, batch, seq_len)
    return ExportReport(out, config, max_abs, tol, opset, dtype)


def run_onnx(path: Path, inputs: Sequence[np.ndarray], pairs: bool) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = dict(zip(input_names(pairs), inputs, strict=True))
    return np.asarray(sess.run(None, feed)[0], dtype=np.float32)


def check_against_engine(
    path: Path,
    backbone: str,
    manifest: TaskManifest,
    tensors: dict[str, torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    pairs: bool,
) -> float:
    """Max-abs difference, over the real tokens of sample batches of ``shapes``, between
    ONNX Runtime on ``path`` and a CPU fp32 engine serving the task."""
    from .engine import Engine  # the engine imports much; only the check needs it
    from .taskstore import write_task

    with tempfile.TemporaryDirectory(prefix="pets-onnx-") as tmp:
        write_task(Path(tmp), manifest, tensors)
        eng = Engine.from_parameters(
            {"BACKBONE": backbone, "TASK_STORE": tmp, "REFRESH_MS": "0", "DTYPE": "float32"}
        )
        try:
            worst = 0.0
            for seed, (b, length) in enumerate(shapes):
                inputs = sample_inputs(eng.spec.vocab, b, length, pairs, seed)
                got = run_onnx(path, inputs, pairs)
                ids, mask = inputs[0], inputs[1]
                n = mask.sum(1)
                rows = [ids[j, : n[j]] for j in range(b)]
                types = [inputs[2][j, : n[j]] for j in range(b)] if pairs else None
                want = eng.run(rows, [manifest.name] * b, types)
                for j, ref in enumerate(want):
                    if not isinstance(ref, np.ndarray):
                        raise ExportError(f"the engine refused the check batch: {ref}")
                    mine = (
                        got[j, : n[j]] if manifest.head.kind == "token_classification" else got[j]
                    )
                    worst = max(worst, float(np.abs(mine - ref).max()))
            return worst
        finally:
            eng.close()


def write_triton_config(
    out: Path,
    manifest: TaskManifest,
    w: BackboneWeights,
    pairs: bool,
    dtype: str,
    dynamic: bool,
    batch: int,
    seq_len: int,
) -> Path:
    """``config.pbtxt`` for Triton's onnxruntime backend. ``out`` inside a version folder
    (``<repo>/<model>/1/model.onnx``) puts it in ``<model>/``, named so; else beside ``out``,
    named after the task."""
    in_version_dir = out.parent.name.isdigit()
    where = out.parent.parent if in_version_dir else out.parent
    name = where.name if in_version_dir else manifest.name
    path = where / "config.pbtxt"
    path.write_text(triton_config(name, out.name, manifest.head, w.spec.hidden, pairs, dtype,
                                  dynamic, batch, seq_len))  # fmt: skip
    return path


def triton_config(
    name: str,
    filename: str,
    head: HeadConfig,
    hidden: int,
    pairs: bool,
    dtype: str,
    dynamic: bool,
    batch: int,
    seq_len: int,
) -> str:
    """The text of a ``config.pbtxt`` serving the exported graph (dims exclude the batch
    axis when ``max_batch_size`` > 0: dynamic exports batch up to 64 same-length requests)."""
    seq = "-1" if dynamic else str(seq_len)
    if head.kind == "embedding":
        out_dims = [str(hidden)]
    elif head.kind == "token_classification":
        out_dims = [seq, str(head.num_labels)]
    else:
        out_dims = [str(head.num_labels)]
    max_batch = 64 if dynamic else 0
    if not dynamic:  # no batch axis taken off: the full fixed shape
        out_dims = [str(batch), *out_dims]
    in_dims = seq if dynamic else f"{batch}, {seq_len}"
    out_type = "TYPE_FP32" if dtype == "fp32" else "TYPE_FP16"
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: TYPE_INT64 dims: [ {in_dims} ] }}' for n in input_names(pairs)
    )
    lines = [
        f"# Written by `pets export-onnx`: task {name!r} ({head.kind} head) for Triton's",
        "# onnxruntime backend. Pad rows to a common length and send attention_mask.",
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f'default_model_filename: "{filename}"',
        f"max_batch_size: {max_batch}",
        "input [",
        inputs,
        "]",
        "output [",
        f'  {{ name: "{output_name(head)}" data_type: {out_type} '
        f"dims: [ {', '.join(out_dims)} ] }}",
        "]",
    ]
    if dynamic:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"
