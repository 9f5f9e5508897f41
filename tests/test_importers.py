"""Importers (PEFT LoRA/IA3 folders, full fine-tuned checkpoints), refusals, memory budget,
capacity and memory release."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from pets.backbone import hf_config, state_from_weights
from pets.capacity import measure, pool_use
from pets.cli import main as cli_main
from pets.engine import Engine, EngineConfig
from pets.errors import TaskError
from pets.heads import HeadConfig
from pets.importers import import_finetuned, import_peft
from pets.taskgen import random_task
from pets.taskstore import list_tasks, read_task, write_task
from pets.validate import scratch_registry

NUM_LABELS = 3


def _seqs(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.r_[101, rng.integers(1000, vocab, size=int(k)), 102] for k in rng.integers(1, 30, size=n)
    ]


def _cls_model(
    backbone, num_labels: int = NUM_LABELS, seed: int = 0
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(**hf_config(backbone.spec), num_labels=num_labels)
    model = BertForSequenceClassification(cfg)
    model.load_state_dict(
        {f"bert.{k}": v for k, v in state_from_weights(backbone).items()}, strict=False
    )
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.2)
        model.classifier.bias.normal_(0, 0.1)
    return model.eval()


def _randomise(model: torch.nn.Module, marker: str, around: float, std: float) -> int:
    g = torch.Generator().manual_seed(1)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(around + torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


@torch.no_grad()
def _logits(model, ids: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(ids, dtype=torch.int64)[None]
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].numpy()


@torch.no_grad()
def _mean_emb(model, ids: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(ids, dtype=torch.int64)[None]
    out = model(input_ids=x, attention_mask=torch.ones_like(x))
    return out.last_hidden_state[0].mean(0).numpy()


def _engine(store: Path, **params: str) -> Engine:
    eng = Engine.from_parameters({"TASK_STORE": str(store), "REFRESH_MS": "0", **params})
    return eng


def _compare(got: list, want: list[np.ndarray], atol: float = 5e-5) -> None:
    for g, w in zip(got, want, strict=True):
        cos = float(np.dot(g, w) / (np.linalg.norm(g) * np.linalg.norm(w)))
        assert cos >= 0.9999, cos
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def _store_snapshot(store: Path) -> tuple:
    gen = store / ".generation"
    return (
        sorted(p.name for p in store.iterdir()) if store.exists() else [],
        gen.stat().st_mtime_ns if gen.exists() else None,
    )


# ------------------------------------------------------------------------------- PEFT
LORA_CASES = {
    "lora_qv": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "lora_all_rs": dict(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["query", "key", "value", "dense"]
    ),  # 'dense': 3 linears (the pooler excluded below)
    # PEFT's usual "all linear" LoRA: 'dense' also adapts bert.pooler.dense (merged)
    "lora_all_pooler": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"]),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_peft_lora_round_trip(case, backbone, tmp_path):
    base = _cls_model(backbone)
    cfg = LoraConfig(
        **LORA_CASES[case],
        modules_to_save=["classifier"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    if case == "lora_all_rs":  # 'dense' would also catch the pooler: exclude it as users do
        cfg.exclude_modules = ["pooler.dense"]
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    # std 0.05 on all linears with rsLoRA: larger makes the model itself ill-conditioned
    # (PEFT fp32 vs fp64 then differ by ~5e-5)
    assert _randomise(pm, "lora_", 0.0, 0.1 if case == "lora_qv" else 0.05) > 0
    pm.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    store = tmp_path / "store"
    res = import_peft(store, case, tmp_path / "adapter", backbone)
    assert res.manifest.pet_type == "lora"
    assert res.manifest.head == HeadConfig("classification", num_labels=NUM_LABELS)
    assert res.manifest.hparams["use_rslora"] == bool(LORA_CASES[case].get("use_rslora"))
    assert ("pooler.dense.weight" in res.tensors) == (case == "lora_all_pooler")
    eng = _engine(store)
    assert not eng.load_errors, eng.load_errors
    seqs = _seqs(6, backbone.spec.vocab)
    want = [_logits(pm, s) for s in seqs]
    _compare(eng.run(seqs, [case] * len(seqs)), want)
    with pm.disable_adapter():  # the adapter matters (the classifier alone does not explain it)
        plain = [_logits(pm, s) for s in seqs]
    assert max(np.abs(p - w).max() for p, w in zip(plain, want, strict=True)) > 1e-2
    if case == "lora_all_pooler":  # the pooler's own delta matters too
        pooler = next(mod for n, mod in pm.named_modules() if n.endswith("pooler.dense"))
        with torch.no_grad():
            pooler.lora_B["default"].weight.zero_()
        without = [_logits(pm, s) for s in seqs]
        assert max(np.abs(p - w).max() for p, w in zip(without, want, strict=True)) > 1e-3


IA3_POOLER = {
    "no_pooler": ([], []),
    "pooler_out": (["pooler.dense"], []),  # [H, 1]: scales the pooler's output
    "pooler_ff": (["pooler.dense"], ["pooler.dense"]),  # [1, H]: scales its input
}


@pytest.mark.parametrize("case", list(IA3_POOLER))
def test_peft_ia3_round_trip(case, backbone, tmp_path):
    base = _cls_model(backbone, seed=1)
    extra_t, extra_ff = IA3_POOLER[case]
    cfg = IA3Config(
        target_modules=["key", "value", "output.dense", *extra_t],
        feedforward_modules=["output.dense", *extra_ff],
        modules_to_save=["classifier"],
        init_ia3_weights=False,
    )
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    assert _randomise(pm, "ia3_l", 1.0, 0.15) == 4 * backbone.spec.layers + len(extra_t)
    pm.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    res = import_peft(tmp_path / "store", "ia3_peft", tmp_path / "adapter", backbone)
    assert res.manifest.pet_type == "ia3"
    assert res.manifest.hparams["feedforward_modules"] == ["attention.output.dense", "output.dense"]
    assert ("pooler.dense.weight" in res.tensors) == bool(extra_t)
    eng = _engine(tmp_path / "store")
    assert not eng.load_errors, eng.load_errors
    seqs = _seqs(6, backbone.spec.vocab, seed=1)
    want = [_logits(pm, s) for s in seqs]
    _compare(eng.run(seqs, ["ia3_peft"] * len(seqs)), want)
    with pm.disable_adapter():
        plain = [_logits(pm, s) for s in seqs]
    assert max(np.abs(p - w).max() for p, w in zip(plain, want, strict=True)) > 1e-2


def test_peft_without_classifier_gets_mean_embedding_head(backbone, tmp_path):
    from oracle import base_model

    pm = get_peft_model(
        base_model(backbone),
        LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False),
    ).eval()
    _randomise(pm, "lora_", 0.0, 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    assert cli_main(["import-peft", str(tmp_path / "store"), "emb", str(tmp_path / "adapter")]) == 0
    manifest, _ = read_task(tmp_path / "store" / "emb")
    assert manifest.head == HeadConfig("embedding", pooling="mean")
    eng = _engine(tmp_path / "store")
    seqs = _seqs(3, backbone.spec.vocab, seed=2)
    _compare(eng.run(seqs, ["emb"] * 3), [_mean_emb(pm, s) for s in seqs])


# ------------------------------------------------------------------------------- fine-tuned
def _finetuned(backbone, tmp_path: Path, weights_too: bool) -> BertForSequenceClassification:
    """Every encoder weight/bias/LN, the pooler and the classifier perturbed (not embeddings)."""
    model = _cls_model(backbone, seed=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            linear_w = name.endswith(".weight") and "encoder" in name and "LayerNorm" not in name
            if "_embeddings" in name or (not weights_too and linear_w):
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(tmp_path / "ft", safe_serialization=True)
    return model


def test_finetuned_density_one_equals_hf(backbone, tmp_path):
    model = _finetuned(backbone, tmp_path, weights_too=True)
    res = import_finetuned(
        tmp_path / "store", "ft_full", tmp_path / "ft", backbone, "diff_pruning", density=1.0
    )
    assert not res.warnings, res.warnings
    assert "pooler.dense.weight" in res.tensors and "classifier.weight" in res.tensors
    eng = _engine(tmp_path / "store")
    assert not eng.load_errors, eng.load_errors
    seqs = _seqs(4, backbone.spec.vocab, seed=3)
    _compare(eng.run(seqs, ["ft_full"] * 4), [_logits(model, s) for s in seqs], atol=1e-4)


def test_finetuned_density_and_bitfit(backbone, tmp_path):
    model = _finetuned(backbone, tmp_path, weights_too=False)  # only biases/LN/pooler/head
    res = import_finetuned(tmp_path / "store", "ft_bitfit", tmp_path / "ft", backbone, "bitfit")
    assert res.manifest.pet_type == "bitfit" and not res.warnings
    eng = _engine(tmp_path / "store")
    seqs = _seqs(4, backbone.spec.vocab, seed=4)
    _compare(eng.run(seqs, ["ft_bitfit"] * 4), [_logits(model, s) for s in seqs], atol=1e-4)

    _finetuned(backbone, tmp_path, weights_too=True)  # now weights changed too
    res = import_finetuned(None, "ft_bitfit2", tmp_path / "ft", backbone, "bitfit")
    assert any("dropped" in w for w in res.warnings)
    res = import_finetuned(
        None, "ft_sparse", tmp_path / "ft", backbone, "diff_pruning", density=0.01
    )
    idx = res.tensors["encoder.layer.0.intermediate.dense.weight_delta_indices"]
    spec = backbone.spec
    assert idx.numel() == int(np.ceil(0.01 * spec.ffn * spec.hidden))


# ------------------------------------------------------------------------------- refusals
def _lora_adapter(backbone, folder: Path, **kw) -> None:
    cfg = LoraConfig(
        **{"r": 4, "target_modules": ["query", "value"], **kw},
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    get_peft_model(_cls_model(backbone), cfg).save_pretrained(folder, safe_serialization=True)


def _refused(store: Path, fn, match: str) -> None:
    before = _store_snapshot(store)
    with pytest.raises(TaskError, match=match):
        fn()
    assert _store_snapshot(store) == before, "a refused import changed the store"


@pytest.fixture
def seeded_store(backbone, tmp_path) -> Path:
    store = tmp_path / "store"
    m, t = random_task(backbone, "existing", "bitfit", HeadConfig("classification", num_labels=2))
    write_task(store, m, t)
    return store


def test_refuse_pickle_adapter(backbone, tmp_path, seeded_store):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _refused(seeded_store, lambda: import_peft(seeded_store, "p", folder, backbone), "pickle")
    assert cli_main(["import-peft", str(seeded_store), "p", str(folder)]) == 2


def test_refuse_dora_and_bad_configs(backbone, tmp_path, seeded_store):
    _lora_adapter(backbone, tmp_path / "dora", use_dora=True)
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "d", tmp_path / "dora", backbone),
        "use_dora.*DoRA",
    )
    _lora_adapter(backbone, tmp_path / "bias", bias="all")
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "b", tmp_path / "bias", backbone),
        "bias='all'",
    )
    _lora_adapter(backbone, tmp_path / "ranks", rank_pattern={"value": 8})
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "r", tmp_path / "ranks", backbone),
        "rank_pattern",
    )
    _lora_adapter(backbone, tmp_path / "layers", layers_to_transform=[0, 1])
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "l", tmp_path / "layers", backbone),
        "layers_to_transform",
    )


def test_refuse_unsupported_target(backbone, tmp_path, seeded_store):
    _lora_adapter(backbone, tmp_path / "emb", target_modules=["query", "word_embeddings"])
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "e", tmp_path / "emb", backbone),
        "outside the BERT linears",
    )
    # LoRA on the classifier: its base weights are not in the adapter, so not representable
    cfg = LoraConfig(r=4, target_modules=["query", "classifier"], init_lora_weights=False)
    get_peft_model(_cls_model(backbone), cfg).save_pretrained(tmp_path / "cls")
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "q", tmp_path / "cls", backbone),
        "classifier.lora_A.*outside the BERT linears",
    )


def test_modules_to_save_refused_only_where_the_file_holds_copies(backbone, tmp_path, seeded_store):
    """A trained copy of a shared module (here every LayerNorm) is refused by name; a listed
    name that matched no module saved nothing and is ignored (PEFT >= 0.22 lists
    DistilBERT's ``pre_classifier`` for every classification model)."""
    cfg = LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier", "LayerNorm"],
                     init_lora_weights=False)  # fmt: skip
    get_peft_model(_cls_model(backbone), cfg).save_pretrained(tmp_path / "ln")
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "ln", tmp_path / "ln", backbone),
        r"modules_to_save \['LayerNorm'\] are trained copies",
    )
    _lora_adapter(backbone, tmp_path / "ghost")
    meta = json.loads((tmp_path / "ghost" / "adapter_config.json").read_text())
    meta["modules_to_save"] = ["classifier", "pre_classifier", "no_such_module"]
    (tmp_path / "ghost" / "adapter_config.json").write_text(json.dumps(meta))
    res = import_peft(seeded_store, "ghost", tmp_path / "ghost", backbone)
    assert res.manifest.head == HeadConfig("classification", num_labels=NUM_LABELS)


def test_pooler_lora_without_classifier_is_dropped_with_a_warning(backbone, tmp_path):
    cfg = LoraConfig(r=4, target_modules=["query", "pooler.dense"], init_lora_weights=False)
    get_peft_model(_cls_model(backbone), cfg).save_pretrained(tmp_path / "a")
    res = import_peft(None, "emb", tmp_path / "a", backbone)
    assert res.manifest.head.kind == "embedding" and "pooler.dense.weight" not in res.tensors
    assert any("bert.pooler.dense" in w and "dropped" in w for w in res.warnings)


def test_refuse_wrong_hidden_size(backbone, tmp_path, seeded_store):
    spec = backbone.spec
    small = dict(
        hf_config(spec), hidden_size=spec.hidden // 2, intermediate_size=spec.ffn // 2, num_labels=2
    )
    model = BertForSequenceClassification(BertConfig(**small)).eval()
    get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ).save_pretrained(tmp_path / "adapter")
    _refused(
        seeded_store,
        lambda: import_peft(seeded_store, "w", tmp_path / "adapter", backbone),
        "another backbone",
    )
    model.save_pretrained(tmp_path / "ft")
    _refused(
        seeded_store,
        lambda: import_finetuned(seeded_store, "w", tmp_path / "ft", backbone),
        "hidden_size=192 but the serving backbone has 384",
    )
    assert list_tasks(seeded_store) == ["existing"]


# ------------------------------------------------------------------------------- memory
def test_memory_budget_refuses_and_leaves_registry_unchanged(backbone):
    reg = scratch_registry(backbone)
    head = HeadConfig("classification", num_labels=2)
    m1, t1 = random_task(backbone, "a1", "adapter", head, seed=1)
    first = reg.add(m1, t1)
    reg.budget_bytes = first.nbytes + first.nbytes // 2  # room for 1.5 adapters
    use, mem, slots = pool_use(reg), reg.memory_bytes(), dict(reg.tasks)
    m2, t2 = random_task(backbone, "a2", "adapter", head, seed=2)
    with pytest.raises(
        TaskError,
        match=r"needs 2\.\d+ MiB.*MEMORY_BUDGET_MB=.*raise "
        r"MEMORY_BUDGET_MB",
    ):
        reg.add(m2, t2)
    assert pool_use(reg) == use and reg.memory_bytes() == mem and reg.tasks == slots
    m3, t3 = random_task(backbone, "small", "ia3", head, seed=3)  # a small task still fits
    reg.add(m3, t3)
    reg.add(m1, t1)  # replacing a task counts its old size as free
    assert set(reg.tasks) == {"a1", "small"}


def test_engine_memory_budget_parameter(backbone, tmp_path):
    assert EngineConfig.from_parameters({"MEMORY_BUDGET_MB": "3"}).memory_budget_mb == 3
    store = tmp_path / "store"
    head = HeadConfig("classification", num_labels=2)
    for i in range(2):  # ~2.3 MiB each
        write_task(store, *random_task(backbone, f"ad{i}", "adapter", head, seed=i))
    eng = _engine(store, MEMORY_BUDGET_MB="3")
    assert len(eng.registry.tasks) == 1
    assert len(eng.load_errors) == 1 and "MEMORY_BUDGET_MB=3" in eng.load_errors[0]


PETS = ["adapter", "bitfit", "diff_pruning", "ia3", "lora", "maskbert"]


@pytest.mark.parametrize("pet", PETS)
def test_memory_returns_after_remove(pet, backbone):
    reg = scratch_registry(backbone)
    head = HeadConfig("classification", num_labels=2)
    use0 = pool_use(reg)
    for i in range(3):
        reg.add(*random_task(backbone, f"t{i}", pet, head, seed=i))
    assert reg.memory_bytes() > 0 and pool_use(reg) != use0
    for i in range(3):
        reg.remove(f"t{i}")
    assert reg.memory_bytes() == 0
    assert pool_use(reg) == use0


def test_capacity_report(backbone):
    rep = measure(
        backbone,
        "cpu",
        torch.float32,
        budget_bytes=1 << 30,
        pets=["ia3", "lora", "adapter"],
        samples=2,
    )
    rows = {r.pet: r for r in rep.rows}
    assert rows["ia3"].task_bytes < rows["lora"].task_bytes < rows["adapter"].task_bytes
    assert all(r.released for r in rep.rows)
    assert rows["lora"].fits == (1 << 30) // rows["lora"].task_bytes
    assert json.loads(json.dumps(rep.to_json()))["rows"][0]["pet"] == "ia3"
    assert "fits" in rep.table()


def test_capacity_report_names_the_form(backbone):
    """MaskBERT's row says which form its tasks took: the index set for a sparse mask, the
    bit mask for a dense one (each with its own size)."""
    sizes = {}
    for density, form in ((0.002, "index"), (0.2, "bitmask")):
        rep = measure(
            backbone,
            "cpu",
            torch.float32,
            budget_bytes=1 << 30,
            pets=["maskbert"],
            hparams={"maskbert": {"density": density}},
            samples=1,
        )
        (row,) = rep.rows
        assert row.form == form and f"maskbert      {form}" in rep.table()
        sizes[form] = row.task_bytes
    assert sizes["index"] < sizes["bitmask"]
