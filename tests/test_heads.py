"""Every head type on every PET type against HF's own head classes; mixed heads batch.

A tiny synthetic backbone (2 layers, hidden 32) keeps this fast: the heads and the token
types, not the backbone size, are under test (tests/test_parity.py covers the real one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from heads_oracle import head_model, head_output
from oracle import ATOL

from pets.backbone import load_backbone
from pets.engine import Engine
from pets.errors import TaskError
from pets.heads import HeadConfig, validate_head
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import read_task, write_task

BACKBONE = "bert-tiny"
HEADS = {
    "cls": HeadConfig("classification", num_labels=3),
    "clsprob": HeadConfig("classification", num_labels=4, output="probabilities"),
    "multi": HeadConfig("multi_label", num_labels=5, output="probabilities"),
    "reg": HeadConfig("regression", num_labels=2),
    "tok": HeadConfig("token_classification", num_labels=7),
    "tokprob": HeadConfig("token_classification", num_labels=3, output="probabilities"),
    "emb": HeadConfig("embedding", pooling="mean", normalize=True),
}
HPARAMS = {"adapter": {"bottleneck": 8}, "lora": {"r": 4, "lora_alpha": 8}}


def _name(pet: str, head: str) -> str:
    return f"{pet}_{head}"


@pytest.fixture(scope="module")
def weights():
    return load_backbone(BACKBONE)


@pytest.fixture(scope="module")
def store(tmp_path_factory, weights):
    store = tmp_path_factory.mktemp("heads_store")
    seed = 0
    for pet in pet_types():
        for key, head in HEADS.items():
            hp = HPARAMS.get(pet, {})
            m, t = random_task(weights, _name(pet, key), pet, head, seed=seed, hparams=hp)
            write_task(store, m, t)
            seed += 1
    return store


@pytest.fixture(scope="module")
def eng(store):
    e = Engine.from_parameters(
        {"BACKBONE": BACKBONE, "TASK_STORE": str(store), "REFRESH_MS": "0", "OPS": "reference"}
    )
    assert not e.load_errors, e.load_errors
    yield e
    e.close()


def _inputs(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``n`` sequences; every other one a sentence pair ``[CLS] a [SEP] b [SEP]``."""
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for i in range(n):
        a = rng.integers(1000, 30000, size=int(rng.integers(1, 12)))
        if i % 2:
            b = rng.integers(1000, 30000, size=int(rng.integers(1, 9)))
            ids = np.r_[101, a, 102, b, 102]
            out.append((ids, np.r_[np.zeros(len(a) + 2), np.ones(len(b) + 1)].astype(np.int64)))
        else:
            out.append((np.r_[101, a, 102], None))
    return out


def test_every_head_on_every_pet_type_matches_hf(eng, store, weights):
    """One mixed batch of every (PET type, head) task, single texts and pairs; each row
    equals HF's head class on the task's oracle model, and the same row run alone."""
    rng = np.random.default_rng(0)
    names = sorted(eng.registry.tasks)
    seqs = _inputs(rng, 2 * len(names))
    tasks = [names[i % len(names)] for i in range(len(seqs))]
    mixed = eng.run([s for s, _ in seqs], tasks, [t for _, t in seqs])
    models = {}
    worst: dict[str, float] = {}
    for (ids, types), task, got in zip(seqs, tasks, mixed, strict=True):
        assert isinstance(got, np.ndarray), got
        manifest, tensors = read_task(store / task)
        if task not in models:
            models[task] = head_model(weights, manifest, tensors)
        want = head_output(models[task], manifest, tensors, ids, types)
        assert got.shape == want.shape, (task, got.shape, want.shape)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=task)
        worst[task] = max(worst.get(task, 0.0), float(np.abs(got - want).max()))
        alone = eng.run([ids], [task], [types])[0]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0, err_msg=f"{task} alone")
    assert set(worst) == set(names)  # every task was checked
    print("\nheads vs HF, max abs: " + ", ".join(f"{t} {v:.1e}" for t, v in sorted(worst.items())))


def test_token_types_change_the_output(eng):
    """Pairs reach the backbone's token-type embeddings: type 1 differs from type 0."""
    ids = np.array([101, 2000, 3000, 102, 4000, 102])
    types = np.array([0, 0, 0, 0, 1, 1])
    for task in ("none_cls", "lora_tok", "bitfit_emb"):
        with_types, without = eng.run([ids, ids], [task, task], [types, None])
        assert np.abs(with_types - without).max() > 1e-4, task  # float noise: ~1e-7


def test_probabilities_are_distributions(eng):
    ids = [np.array([101, 2000 + i, 102]) for i in range(4)]
    p = eng.run(ids, ["lora_clsprob"] * 4)
    for row in p:
        assert row.shape == (4,) and abs(row.sum() - 1) < 1e-5 and (row > 0).all()
    tok = eng.run(ids, ["ia3_tokprob"] * 4)
    for row in tok:
        assert row.shape == (3, 3)
        np.testing.assert_allclose(row.sum(-1), 1, atol=1e-5)
    multi = eng.run(ids, ["adapter_multi"] * 4)
    for row in multi:
        assert row.shape == (5,) and ((row > 0) & (row < 1)).all()
        assert abs(row.sum() - 1) > 1e-3  # independent sigmoids, not a softmax


def test_padded_layout_matches_packed(eng):
    """PetS's padded batches: pads are never read by the token heads nor returned."""
    rng = np.random.default_rng(3)
    names = sorted(eng.registry.tasks)
    seqs = _inputs(rng, len(names))
    slots = [eng.registry.tasks[n].slot for n in names]
    ids = [s for s, _ in seqs]
    types = [t for _, t in seqs]
    packed = eng.run(ids, names, types)
    batch = eng.encoder.batch(ids, slots, pad_to=24, types=types)
    out, width = eng.encoder.forward(batch)
    plan = eng.encoder.prepare(batch).head
    n = len(ids)
    for row, caller in enumerate(batch.order):
        if plan.tok_start is not None and plan.tok_start[row] >= 0:
            first = n + int(plan.tok_start[row])
            got = out[first : first + int(plan.tok_len[row]), : width[row]].numpy()
        else:
            got = out[row, : width[row]].numpy()
        want = packed[caller]
        assert isinstance(want, np.ndarray)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=names[caller])


def test_execute_token_head_returns_k_l_c(eng):
    ids = np.array([[101, 2000, 3000, 102], [101, 2001, 3001, 102]], dtype=np.int64)
    types = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=np.int64)
    task = np.array([[b"maskbert_tok"]], dtype=object)
    (out,) = eng.execute([{"TASK": task, "INPUT_IDS": ids, "TOKEN_TYPE_IDS": types}])
    assert isinstance(out, np.ndarray) and out.shape == (2, 4, 7)
    rows = eng.run(list(ids), ["maskbert_tok"] * 2, [types[0], None])
    np.testing.assert_allclose(out, np.stack(rows), atol=1e-6, rtol=0)  # type: ignore[arg-type]
    mixed = np.array([[b"maskbert_tok"], [b"lora_cls"]], dtype=object)
    (err,) = eng.execute([{"TASK": mixed, "INPUT_IDS": ids}])
    assert "outputs of different widths or token counts" in str(err)
    bad = np.array([[0, 0, 2, 1], [0, 0, 0, 0]], dtype=np.int64)
    (err,) = eng.execute([{"TASK": task, "INPUT_IDS": ids, "TOKEN_TYPE_IDS": bad}])
    assert "outside the backbone's token types [0, 2)" in str(err)
    (err,) = eng.execute([{"TASK": task, "INPUT_IDS": ids, "TOKEN_TYPE_IDS": types[:, :3]}])
    assert "TOKEN_TYPE_IDS has shape [2, 3] but INPUT_IDS has [2, 4]" in str(err)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"type": "regression", "output": "probabilities"}, "returns raw scores"),
        ({"type": "multi_label"}, "needs integer num_labels"),
        ({"type": "classification", "num_labels": 2, "output": "softmax"}, "'probabilities'"),
        ({"type": "embedding", "num_labels": 2}, "got also ['num_labels']"),
        ({"type": "token_classification", "num_labels": 2, "pairs": 1}, "pairs must be"),
        ({"type": "ner"}, "token_classification"),
    ],
)
def test_bad_head_declarations_are_refused(obj, message):
    with pytest.raises(TaskError, match=None) as err:
        HeadConfig.parse(obj)
    assert message in str(err.value)


def test_head_json_round_trip_and_defaults():
    for head in HEADS.values():
        assert HeadConfig.parse(head.to_json()) == head
    assert HeadConfig.parse({"type": "regression"}).num_labels == 1
    pair = HeadConfig.parse({"type": "classification", "num_labels": 1, "pairs": True})
    assert pair.pairs and pair.to_json()["pairs"] is True
    # The default is what HF returns: raw logits, and the manifest stays as it was.
    assert HeadConfig.parse({"type": "classification", "num_labels": 2}).output == "logits"
    assert "output" not in HeadConfig("classification", num_labels=2).to_json()


def test_token_head_takes_no_pooler(weights):
    h = weights.spec.hidden
    tensors = {
        "classifier.weight": torch.zeros(2, h),
        "classifier.bias": torch.zeros(2),
        "pooler.dense.weight": torch.zeros(h, h),
        "pooler.dense.bias": torch.zeros(h),
    }
    with pytest.raises(TaskError, match="token_classification head uses no pooler"):
        validate_head(HeadConfig("token_classification", num_labels=2), weights.spec, tensors)


def test_staged_reused_batches_restage_token_types(store, eng):
    """The serving path's staged layout (a CPU stand-in for the device buffer): a batch like
    a recent one reuses its plans and restages token ids *and* token types."""
    from pets.staging import Stager

    staged = Engine.from_parameters(
        {"BACKBONE": BACKBONE, "TASK_STORE": str(store), "REFRESH_MS": "0", "OPS": "reference"}
    )
    staged.stager = Stager(torch.device("cpu"), capacity=1 << 12, enabled=True)
    tasks = ["lora_tok", "ia3_clsprob", "adapter_emb", "diff_pruning_multi"]
    try:
        for seed in range(3):  # same tasks and lengths, new ids and types each time
            rng = np.random.default_rng(seed)
            ids = [rng.integers(1000, 2000, size=6 + i) for i in range(4)]
            types = [(rng.random(6 + i) < 0.5).astype(np.int64) for i in range(4)]
            types[1] = None  # a row without pairs in a batch with pairs
            got, want = staged.run(ids, tasks, types), eng.run(ids, tasks, types)
            for g, w in zip(got, want, strict=True):
                assert isinstance(g, np.ndarray) and isinstance(w, np.ndarray)
                np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
        assert len(staged._templates) == 1  # one layout, reused twice
    finally:
        staged.close()


def test_text_pair_tokenizes_like_hf():
    """TEXT_PAIR: ``[CLS] a [SEP] b [SEP]`` with HF's token type ids; an empty pair row is
    a single text; misplaced pair inputs are refused with the fix."""
    from transformers import AutoTokenizer

    from pets.backbone import default_checkpoint
    from pets.errors import RequestError
    from pets.protocol import Limits, decode_request
    from pets.tokenizer import load_tokenizer

    ckpt = default_checkpoint()
    tok, hf = load_tokenizer(ckpt, 512), AutoTokenizer.from_pretrained(str(ckpt))

    def req(**kw: list[str]) -> dict[str, np.ndarray]:
        out = {"TASK": np.array([[b"t"]], dtype=object)}
        for k, v in kw.items():
            out[k] = np.array([[x.encode()] for x in v], dtype=object)
        return out

    a, b = ["is it raining?", "a query"], ["the streets are wet", ""]
    rows = decode_request(req(TEXT=a, TEXT_PAIR=b), tok, Limits(512, 30522))
    want = hf(a[0], b[0])
    assert rows[0].ids.tolist() == want["input_ids"]
    assert rows[0].types is not None and rows[0].types.tolist() == want["token_type_ids"]
    assert rows[1].ids.tolist() == hf(a[1])["input_ids"] and rows[1].types is None
    for bad, message in (
        (req(TEXT=a, TEXT_PAIR=b[:1]), "TEXT_PAIR has 1 rows but TEXT has 2"),
        ({**req(TEXT=a), "TOKEN_TYPE_IDS": np.zeros((2, 3), np.int64)}, "goes with INPUT_IDS"),
        (
            {**req(TEXT_PAIR=b), "INPUT_IDS": np.ones((2, 3), np.int64)},
            "TEXT_PAIR goes with TEXT",
        ),
    ):
        with pytest.raises(RequestError) as err:
            decode_request(bad, tok, Limits(512, 30522))
        assert message in str(err.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_every_head_with_pairs(store, eng):
    """On CUDA (fp32): the staged, graph-captured forward (captured on a layout's second
    batch, replayed from the third) of a mixed-head batch with token types equals the CPU
    engine; new ids and types on the same layout are restaged, not replanned."""
    cuda = Engine.from_parameters(
        {"BACKBONE": BACKBONE, "TASK_STORE": str(store), "REFRESH_MS": "0", "DTYPE": "float32"},
        device="cuda",
    )
    names = sorted(cuda.registry.tasks)
    try:
        assert cuda.graphs is not None
        for seed in range(4):
            rng = np.random.default_rng(seed)
            seqs = [(rng.integers(1000, 30000, size=5 + i % 7), i % 2) for i in range(len(names))]
            ids = [s for s, _ in seqs]
            types = [(np.arange(len(s)) >= len(s) // 2).astype(np.int64) if p else None
                     for s, p in seqs]  # fmt: skip
            got, want = cuda.run(ids, names, types), eng.run(ids, names, types)
            for name, g, w in zip(names, got, want, strict=True):
                assert isinstance(g, np.ndarray) and isinstance(w, np.ndarray), (g, w)
                np.testing.assert_allclose(g, w, atol=1e-3, rtol=0, err_msg=name)
        assert cuda.graphs.replays >= 2, (cuda.graphs.replays, cuda.graphs.eager)
    finally:
        cuda.close()
