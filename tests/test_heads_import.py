"""Importers map heads: PEFT ``task_type`` (SEQ_CLS, TOKEN_CLS) and ``modules_to_save``
classifiers, fine-tuned ``problem_type`` / ``architectures``; the served outputs equal the
source model's (HF/PEFT, on a tiny synthetic backbone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from pets.backbone import hf_config, load_backbone, state_from_weights
from pets.cli import main as cli_main
from pets.engine import Engine
from pets.errors import TaskError
from pets.heads import HeadConfig
from pets.importers import convert_peft, import_finetuned, import_peft

BACKBONE = "bert-tiny"


@pytest.fixture(scope="module")
def weights():
    return load_backbone(BACKBONE)


def _model(weights, cls, num_labels: int, seed: int, **cfg):
    torch.manual_seed(seed)
    model = cls(BertConfig(**hf_config(weights.spec), num_labels=num_labels, **cfg))
    model.load_state_dict(
        {f"bert.{k}": v for k, v in state_from_weights(weights).items()}, strict=False
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.3)
        model.classifier.bias.normal_(0, 0.1)
    return model.eval()


def _perturb(model: torch.nn.Module, marker: str, std: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name and "embeddings" not in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _run(store, name: str, seqs: list[np.ndarray]) -> list[np.ndarray]:
    eng = Engine.from_parameters(
        {"BACKBONE": BACKBONE, "TASK_STORE": str(store), "REFRESH_MS": "0"}
    )
    try:
        assert not eng.load_errors, eng.load_errors
        out = eng.run(seqs, [name] * len(seqs))
    finally:
        eng.close()
    assert all(isinstance(o, np.ndarray) for o in out), out
    return out  # type: ignore[return-value]


@torch.no_grad()
def _hf(model, ids: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(ids)[None]
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].numpy()


SEQS = [np.array([101, 2000 + i, 3000, 4000 + 7 * i, 102]) for i in range(3)]


def test_peft_token_cls_becomes_a_token_head(weights, tmp_path):
    base = _model(weights, BertForTokenClassification, 5, seed=0)
    cfg = LoraConfig(task_type="TOKEN_CLS", r=4, target_modules=["query", "value"],
                     init_lora_weights=False)  # fmt: skip
    pm = get_peft_model(base, cfg).eval()
    _perturb(pm, "classifier", 0.1)  # PEFT's trained copy (modules_to_save) is what counts
    pm.save_pretrained(tmp_path / "adapter")
    res = import_peft(tmp_path / "store", "ner", tmp_path / "adapter", weights)
    assert res.manifest.head == HeadConfig("token_classification", num_labels=5)
    assert "pooler.dense.weight" not in res.tensors
    for got, ids in zip(_run(tmp_path / "store", "ner", SEQS), SEQS, strict=True):
        want = _hf(pm, ids)
        assert got.shape == want.shape == (len(ids), 5)
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


def test_peft_seq_cls_as_multi_label_probabilities_via_cli(weights, tmp_path):
    base = _model(weights, BertForSequenceClassification, 4, seed=1)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "key"],
                     init_lora_weights=False)  # fmt: skip
    pm = get_peft_model(base, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    args = ["--backbone", BACKBONE, "--head", "multi_label", "--output", "probabilities"]
    rc = cli_main(["import-peft", str(tmp_path / "store"), "tags", str(tmp_path / "adapter"),
                   *args])  # fmt: skip
    assert rc == 0
    for got, ids in zip(_run(tmp_path / "store", "tags", SEQS), SEQS, strict=True):
        want = torch.sigmoid(torch.as_tensor(_hf(pm, ids))).numpy()
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    rc = cli_main(["import-peft", str(tmp_path / "store"), "t2", str(tmp_path / "adapter"),
                   "--backbone", BACKBONE, "--head", "token_classification"])  # fmt: skip
    assert rc == 2  # a sequence classifier is no token classifier


@pytest.mark.parametrize(
    ("cls", "labels", "problem", "kind"),
    [
        (BertForSequenceClassification, 1, "regression", "regression"),
        (BertForSequenceClassification, 3, "multi_label_classification", "multi_label"),
        (BertForTokenClassification, 4, None, "token_classification"),
    ],
)
def test_finetuned_heads_follow_the_checkpoint(weights, tmp_path, cls, labels, problem, kind):
    extra = {"problem_type": problem} if problem else {}
    model = _model(weights, cls, labels, seed=2, **extra)
    _perturb(model, "encoder", 0.02)
    model.save_pretrained(tmp_path / "ft", safe_serialization=True)
    res = import_finetuned(tmp_path / "store", "ft", tmp_path / "ft", weights,
                           "diff_pruning", density=1.0)  # fmt: skip
    assert res.manifest.head == HeadConfig(kind, num_labels=labels)
    if kind == "token_classification":  # no pooler in the model, none needed by the head
        assert not [w for w in res.warnings if "pooler" in w], res.warnings
    for got, ids in zip(_run(tmp_path / "store", "ft", SEQS), SEQS, strict=True):
        np.testing.assert_allclose(got, _hf(model, ids), atol=5e-5, rtol=0)


def test_classifier_less_classification_source_is_refused(weights):
    cfg = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 2,
           "target_modules": ["query"]}  # fmt: skip
    h = weights.spec.hidden
    raw = {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.query.lora_{m}.weight": (
            torch.zeros(2, h) if m == "A" else torch.zeros(h, 2)
        )
        for i in range(weights.spec.layers)
        for m in ("A", "B")
    }
    with pytest.raises(TaskError, match=r"classification model .* carries no classifier"):
        convert_peft(weights, "x", cfg, raw)
    emb = convert_peft(weights, "x", cfg, raw, HeadConfig("embedding", pooling="cls"))
    assert emb.manifest.head.kind == "embedding"
