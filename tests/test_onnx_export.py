"""``pets export-onnx``: every head type x every PET type exports and matches the engine
(ONNX Runtime, fp32 max-abs <= 1e-4) and the HF oracle; refusals; the Triton config.

The grid uses the TorchScript exporter (under a second per model; the dynamo default takes
~15 s on a busy 2-core machine) on a tiny synthetic backbone; the default dynamo path, the
built-in engine check and fp16 are exercised once each.
"""

from __future__ import annotations

import numpy as np
import pytest
from heads_oracle import head_model, head_output

from pets import onnx_export
from pets.backbone import load_backbone
from pets.cli import main
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.onnx_export import ExportError, export_task, run_onnx, sample_inputs
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import read_task, write_task

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

BACKBONE = "bert-tiny"
HEADS = {
    "cls": HeadConfig("classification", num_labels=3, pairs=True),  # a cross-encoder
    "multi": HeadConfig("multi_label", num_labels=4, output="probabilities"),
    "reg": HeadConfig("regression", num_labels=1, pairs=True),
    "tok": HeadConfig("token_classification", num_labels=5, output="probabilities"),
    "emb": HeadConfig("embedding", pooling="mean", normalize=True),
}
PETS = sorted(pet_types())
HPARAMS = {"adapter": {"bottleneck": 8, "activation": "gelu"}, "lora": {"r": 4, "lora_alpha": 8}}
SHAPES = [(2, 16), (3, 7)]


@pytest.fixture(scope="module")
def weights():
    return load_backbone(BACKBONE)


@pytest.fixture(scope="module")
def store(tmp_path_factory, weights):
    store = tmp_path_factory.mktemp("onnx_store")
    for i, (pet, (key, head)) in enumerate((p, h) for p in PETS for h in HEADS.items()):
        m, t = random_task(weights, f"{pet}_{key}", pet, head, seed=i, hparams=HPARAMS.get(pet))
        write_task(store, m, t)
    return store


@pytest.fixture(scope="module")
def eng(store):
    e = Engine.from_parameters({"BACKBONE": BACKBONE, "TASK_STORE": str(store), "REFRESH_MS": "0"})
    assert not e.load_errors, e.load_errors
    yield e
    e.close()


def compare(path, eng, store, weights, task: str, pairs: bool, hf: bool) -> tuple[float, float]:
    """Max-abs of ONNX Runtime vs the engine (and, if ``hf``, vs the HF oracle; else nan)
    over the real tokens of sample batches of :data:`SHAPES` (pair tasks get token types)."""
    manifest, tensors = read_task(store / task)
    model = head_model(weights, manifest, tensors) if hf else None
    vs_engine, vs_hf = 0.0, 0.0 if hf else float("nan")
    for seed, (b, length) in enumerate(SHAPES):
        inputs = sample_inputs(weights.spec.vocab, b, length, pairs, seed)
        got = run_onnx(path, inputs, pairs)
        n = inputs[1].sum(1)
        rows = [inputs[0][j, : n[j]] for j in range(b)]
        types = [inputs[2][j, : n[j]] for j in range(b)] if pairs else [None] * b
        served = eng.run(rows, [task] * b, types)
        for j in range(b):
            mine = got[j, : n[j]] if manifest.head.kind == "token_classification" else got[j]
            vs_engine = max(vs_engine, float(np.abs(mine - served[j]).max()))
            if model is not None:
                want = head_output(model, manifest, tensors, rows[j], types[j])
                vs_hf = max(vs_hf, float(np.abs(mine - want).max()))
    return vs_engine, vs_hf


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("pet", PETS)
def test_every_head_and_pet_type_exports_and_matches(pet, head, eng, store, weights, tmp_path):
    task = f"{pet}_{head}"
    manifest, tensors = read_task(store / task)
    out = tmp_path / task / "1" / "model.onnx"
    rep = export_task(weights, BACKBONE, manifest, tensors, out, check=False,
                      exporter="torchscript")  # fmt: skip
    onnx.checker.check_model(str(out))
    names = [i.name for i in onnx.load(str(out)).graph.input]
    pairs = HEADS[head].pairs
    assert names == ["input_ids", "attention_mask", *(["token_type_ids"] if pairs else [])]
    # The engine equals HF's head classes for every pair (tests/test_heads.py); here the
    # export is held to the engine, and to HF directly for one PET type per head.
    hf = pet == "lora"
    vs_engine, vs_hf = compare(out, eng, store, weights, task, pairs, hf)
    print(
        f"\nparity {task}: ONNX vs engine {vs_engine:.2e}" + (f", vs HF {vs_hf:.2e}" if hf else "")
    )
    assert vs_engine <= onnx_export.FP32_TOL, f"{task}: ONNX vs engine {vs_engine:.3g}"
    assert not hf or vs_hf <= 2e-4, f"{task}: ONNX vs HF {vs_hf:.3g}"
    assert rep.config_path == tmp_path / task / "config.pbtxt"
    assert f'name: "{task}"' in rep.config_path.read_text()


def test_default_dynamo_export_checks_itself(eng, store, weights, tmp_path):
    """The default path: dynamo exporter, dynamic axes, checked against the engine."""
    manifest, tensors = read_task(store / "adapter_tok")
    rep = export_task(weights, BACKBONE, manifest, tensors, tmp_path / "a.onnx")
    assert rep.max_abs <= onnx_export.FP32_TOL
    vs_engine, vs_hf = compare(rep.path, eng, store, weights, "adapter_tok", False, True)
    assert vs_engine <= onnx_export.FP32_TOL and vs_hf <= 2e-4
    graph = onnx.load(str(tmp_path / "a.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in dims), dims  # dynamic
    cfg = rep.config_path.read_text()  # beside the file, named after the task
    assert rep.config_path == tmp_path / "config.pbtxt" and 'name: "adapter_tok"' in cfg
    assert 'default_model_filename: "a.onnx"' in cfg
    assert 'name: "probabilities" data_type: TYPE_FP32 dims: [ -1, 5 ]' in cfg


def test_fp16_and_static_exports(store, weights, tmp_path):
    manifest, tensors = read_task(store / "lora_cls")
    rep = export_task(weights, BACKBONE, manifest, tensors, tmp_path / "h.onnx", dtype="fp16",
                      exporter="torchscript")  # fmt: skip
    assert rep.max_abs <= onnx_export.FP16_TOL and "TYPE_FP16" in rep.config_path.read_text()
    rep = export_task(weights, BACKBONE, manifest, tensors, tmp_path / "s" / "s.onnx",
                      dynamic=False, batch=2, seq_len=16, exporter="torchscript")  # fmt: skip
    cfg = rep.config_path.read_text()
    assert "max_batch_size: 0" in cfg and "dims: [ 2, 16 ]" in cfg and "dims: [ 2, 3 ]" in cfg
    with pytest.raises(Exception, match=r"(?i)dim|shape|index"):
        run_onnx(rep.path, sample_inputs(weights.spec.vocab, 3, 7, True), True)


def test_what_cannot_be_exported_is_refused_by_name(store, weights, tmp_path, monkeypatch):
    manifest, tensors = read_task(store / "lora_cls")
    monkeypatch.delitem(onnx_export.MERGERS, "lora")
    with pytest.raises(ExportError, match="PET type 'lora' cannot be exported to ONNX"):
        export_task(weights, BACKBONE, manifest, tensors, tmp_path / "x.onnx")
    monkeypatch.undo()
    with pytest.raises(ExportError, match="--dtype 'int8'; expected fp32 or fp16"):
        export_task(weights, BACKBONE, manifest, tensors, tmp_path / "x.onnx", dtype="int8")
    del tensors["classifier.bias"]
    with pytest.raises(ExportError, match=r"not valid here.*classifier\.bias"):
        export_task(weights, BACKBONE, manifest, tensors, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_onnx(store, tmp_path, capsys):
    out = tmp_path / "repo" / "ia3_reg" / "1" / "model.onnx"
    rc = main(["export-onnx", str(store), "ia3_reg", str(out), "--backbone", BACKBONE,
               "--exporter", "torchscript"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "ONNX Runtime vs engine max-abs" in said and out.is_file()
    assert (tmp_path / "repo" / "ia3_reg" / "config.pbtxt").is_file()
    rc = main(["export-onnx", str(store), "nope", str(out), "--backbone", BACKBONE])
    assert rc == 2 and "nope" in capsys.readouterr().err
