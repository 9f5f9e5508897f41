"""IA3: served output vs PEFT's own IA3 model, mixed batches, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import IA3Config, get_peft_model
from transformers import BertConfig, BertModel

from pets.backbone import hf_config, state_from_weights
from pets.engine import Engine
from pets.errors import TaskError
from pets.heads import HeadConfig
from pets.pet.common import layer_key
from pets.taskgen import random_task
from pets.taskstore import write_task
from pets.validate import validate_task

ATOL = 2e-5  # fp32, 6 layers; observed ~1e-6

# name -> (PEFT target_modules, PEFT feedforward_modules, head)
IA3_TASKS = {
    # PEFT's BERT default: key/value outputs, attention.output.dense + output.dense inputs
    "ia3_default": (
        ["key", "value", "output.dense"],
        ["output.dense"],
        HeadConfig("embedding", pooling="mean"),
    ),
    # output scaling everywhere it can be: q/k/v and both output denses as non-feedforward
    "ia3_outputs": (
        ["query", "key", "value", "output.dense"],
        [],
        HeadConfig("classification", num_labels=3),
    ),
    # FFN-only (feedforward output.dense as a regex, the other PEFT spelling)
    "ia3_ffn": (
        r".*\.output\.dense",
        r"^(?!.*attention).*output\.dense",
        HeadConfig("embedding", pooling="cls", normalize=True),
    ),
}
OTHERS = [
    ("other_lora", "lora", {"r": 4}),
    ("other_adapter", "adapter", {"bottleneck": 8}),
    ("other_diff", "diff_pruning", {}),
]


def _seqs(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    return [
        np.r_[101, rng.integers(1000, vocab, size=int(k)), 102] for k in rng.integers(1, 30, size=n)
    ]


@pytest.fixture(scope="module")
def ia3_store(tmp_path_factory, backbone) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("ia3store")
    made = {}
    for seed, (name, (targets, ff, head)) in enumerate(IA3_TASKS.items(), start=10):
        m, t = random_task(
            backbone,
            name,
            "ia3",
            head,
            seed=seed,
            hparams={"target_modules": targets, "feedforward_modules": ff},
        )
        write_task(store, m, t)
        made[name] = (m, t)
    for seed, (name, pet, hp) in enumerate(OTHERS, start=50):
        m, t = random_task(
            backbone, name, pet, HeadConfig("classification", num_labels=3), seed=seed, hparams=hp
        )
        write_task(store, m, t)
    return store, made


@pytest.fixture(scope="module")
def ia3_engine(ia3_store) -> Engine:
    eng = Engine.from_parameters({"TASK_STORE": str(ia3_store[0]), "REFRESH_MS": "0"})
    assert not eng.load_errors, eng.load_errors
    return eng


def _peft_model(backbone, targets, ff, tensors) -> torch.nn.Module:
    model = BertModel(BertConfig(**hf_config(backbone.spec)), add_pooling_layer=True).eval()
    model.load_state_dict(state_from_weights(backbone), strict=False)
    cfg = IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)
    pm = get_peft_model(model, cfg)
    sd = pm.state_dict()
    n = 0
    for k in sd:
        if k.endswith("ia3_l.default"):
            ours = k.removeprefix("base_model.model.").removesuffix(".default")
            sd[k] = tensors[ours].reshape(sd[k].shape)  # our flat layout, PEFT's [out,1]/[1,in]
            n += 1
    assert n == len(tensors), (n, sorted(tensors)[:4])
    pm.load_state_dict(sd)
    return pm.eval()


@torch.no_grad()
def _head_out(model, head: HeadConfig, tensors, ids) -> np.ndarray:
    x = torch.as_tensor(ids, dtype=torch.int64)[None]
    out = model(input_ids=x, attention_mask=torch.ones_like(x))
    if head.kind == "classification":
        return torch.nn.functional.linear(
            out.pooler_output, tensors["classifier.weight"], tensors["classifier.bias"]
        )[0].numpy()
    hidden = out.last_hidden_state[0]
    emb = hidden.mean(0) if head.pooling == "mean" else hidden[0]
    return (torch.nn.functional.normalize(emb, dim=-1) if head.normalize else emb).numpy()


@pytest.mark.parametrize("name", list(IA3_TASKS))
def test_ia3_matches_peft(name, ia3_store, ia3_engine, backbone):
    _, made = ia3_store
    _manifest, tensors = made[name]
    targets, ff, head = IA3_TASKS[name]
    pet_t = {k: v for k, v in tensors.items() if k.endswith(".ia3_l")}
    model = _peft_model(backbone, targets, ff, pet_t)
    rng = np.random.default_rng(0)
    seqs = _seqs(rng, 4, backbone.spec.vocab)
    served = ia3_engine.run(seqs, [name] * len(seqs))
    for ids, got in zip(seqs, served, strict=True):
        want = _head_out(model, head, tensors, ids)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=name)
        with model.disable_adapter():  # non-vacuous: IA3 visibly changes the output
            plain = _head_out(model, head, tensors, ids)
        assert np.abs(plain - want).max() > 1e-2, f"{name}: IA3 has no visible effect"


def test_ia3_default_layout(ia3_store, backbone):
    """PEFT's BERT default adapts key, value, attention.output.dense (ff) and output.dense (ff)."""
    manifest, tensors = ia3_store[1]["ia3_default"]
    spec = backbone.spec
    assert manifest.hparams["feedforward_modules"] == ["attention.output.dense", "output.dense"]
    assert tensors[layer_key(0, "attention.self.key", "ia3_l")].shape == (spec.hidden,)
    assert tensors[layer_key(0, "attention.output.dense", "ia3_l")].shape == (spec.hidden,)
    assert tensors[layer_key(0, "output.dense", "ia3_l")].shape == (spec.ffn,)


def test_ia3_mixed_batch_equals_alone(ia3_engine, ia3_store, backbone):
    rng = np.random.default_rng(3)
    names = [*IA3_TASKS, *(n for n, _, _ in OTHERS)]
    seqs = _seqs(rng, 40, backbone.spec.vocab)
    tasks = [names[i] for i in rng.integers(0, len(names), size=len(seqs))]
    mixed = ia3_engine.run(seqs, tasks)
    for i, (ids, task) in enumerate(zip(seqs, tasks, strict=True)):
        alone = ia3_engine.run([ids], [task])[0]
        np.testing.assert_allclose(mixed[i], alone, atol=1e-5, rtol=0, err_msg=f"{i} {task}")
    # IA3 scales keep the per-segment bias pass (no qkv bias in the shared GEMM)
    enc, reg = ia3_engine.encoder, ia3_engine.registry
    prepared = enc.prepare(enc.batch(seqs[:1], [reg.tasks[next(iter(IA3_TASKS))].slot]))
    assert prepared.sp.scale is not None and not prepared.sp.shared_bias


def test_ia3_scale_rows_released(ia3_engine, backbone):
    """Loading takes one ctx.scale row (plus a pool blob for output scales); removal frees them."""
    reg = ia3_engine.registry
    used, mem = ia3_engine.ctx.scale.used, reg.memory_bytes()
    method = reg.methods["ia3"]
    pool_used = method.pool.used
    m, t = random_task(
        backbone,
        "ia3_tmp",
        "ia3",
        HeadConfig("classification", num_labels=2),
        seed=99,
        hparams={"target_modules": ["query", "output.dense"], "feedforward_modules": []},
    )
    entry = reg.add(m, t)
    assert entry.loaded.scale_slot > 0 and ia3_engine.ctx.scale.used == used + 1
    assert method.pool.used > pool_used and method.has_output_transform
    reg.remove("ia3_tmp")
    assert ia3_engine.ctx.scale.used == used and method.pool.used == pool_used
    assert reg.memory_bytes() == mem


@pytest.mark.parametrize(
    "targets,ff,match",
    [
        (["intermediate.dense"], [], "intermediate.dense"),
        (["query"], ["query"], "shared input"),
    ],
)
def test_ia3_refusals(backbone, targets, ff, match):
    m, t = random_task(
        backbone,
        "bad",
        "ia3",
        HeadConfig("embedding"),
        seed=1,
        hparams={"target_modules": targets, "feedforward_modules": ff},
    )
    with pytest.raises(TaskError, match=match):
        validate_task(backbone, m, t)


def test_ia3_wrong_shape_refused(backbone):
    m, t = random_task(backbone, "bad", "ia3", HeadConfig("embedding"), seed=1)
    key = layer_key(0, "output.dense", "ia3_l")
    t[key] = t[key][: backbone.spec.hidden]  # [H] where a feedforward output.dense needs [F]
    with pytest.raises(TaskError, match="shape"):
        validate_task(backbone, m, t)
    m.hparams["feedforward_modules"] = ["nonsense"]
    with pytest.raises(TaskError, match="not a BERT linear"):
        validate_task(backbone, m, t)
