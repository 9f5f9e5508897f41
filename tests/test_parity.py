"""Served outputs vs independent HF/PEFT oracles, and the batching invariants."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from oracle import ATOL, base_model, oracle_output, task_model

from petops import compiled_available
from pets import kernels
from pets.backbone import SITES
from pets.engine import Engine, EngineConfig
from pets.errors import ConfigError
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import list_tasks, read_task, write_task


def _seqs(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    lens = rng.integers(1, 40, size=n)
    return [np.r_[101, rng.integers(1000, vocab, size=int(length)), 102] for length in lens]


@pytest.fixture(params=["reference", "compiled"])
def ops_mode(request, engine):
    """Run the test with the pure-PyTorch references, then with the compiled library."""
    if request.param == "compiled" and not compiled_available():
        pytest.skip("compiled op library not built; run build/build_ops.sh")
    saved = engine.ctx.ops
    engine.ctx.ops = kernels.select(request.param)[0]
    yield request.param
    engine.ctx.ops = saved


def test_every_task_matches_its_oracle(engine, task_store, backbone, ops_mode):
    rng = np.random.default_rng(0)
    seqs = _seqs(rng, 4, backbone.spec.vocab)
    base = base_model(backbone)
    for name in list_tasks(task_store):
        manifest, tensors = read_task(task_store / name)
        model = task_model(backbone, manifest, tensors)
        served = engine.run(seqs, [name] * len(seqs))
        for ids, got in zip(seqs, served, strict=True):
            want = oracle_output(model, manifest, tensors, ids)
            np.testing.assert_allclose(
                got, want, atol=ATOL, rtol=0, err_msg=f"task {name} ({manifest.pet_type})"
            )
            # The PET must change the output: the same head on the bare backbone differs.
            plain = oracle_output(base, manifest, tensors, ids)
            assert np.abs(plain - want).max() > 1e-2, f"{name}: PET has no visible effect"


def test_mixed_batch_equals_each_task_alone(engine, task_store, backbone, ops_mode):
    rng = np.random.default_rng(1)
    names = list_tasks(task_store)
    seqs = _seqs(rng, 48, backbone.spec.vocab)
    tasks = [names[i] for i in rng.integers(0, len(names), size=len(seqs))]
    mixed = engine.run(seqs, tasks)
    for i, (ids, task) in enumerate(zip(seqs, tasks, strict=True)):
        alone = engine.run([ids], [task])[0]
        np.testing.assert_allclose(
            mixed[i], alone, atol=1e-5, rtol=0, err_msg=f"row {i} task {task}"
        )


def test_qkv_bias_rides_in_the_gemm_only_for_backbone_biases(engine, task_store, backbone):
    """A batch whose tasks all take the backbone's biases and no IA3 scales adds the qkv bias
    in the shared GEMM (``SegmentParams.shared_bias``); a task with its own biases (BitFit)
    or IA3 scales in the batch keeps the per-segment bias pass. The oracle and mixed-batch
    tests above compare the two paths' outputs."""
    reg, enc = engine.registry, engine.encoder
    ids = _seqs(np.random.default_rng(3), 2, backbone.spec.vocab)
    by_type = {reg.tasks[n].manifest.pet_type: n for n in list_tasks(task_store)}
    for pets, want in ((["lora"], True), (["lora", "lora"], True), (["lora", "bitfit"], False)):
        slots = [reg.tasks[by_type[p]].slot for p in pets]
        prepared = enc.prepare(enc.batch(ids[: len(slots)], slots))
        assert prepared.sp.shared_bias is want, pets


def test_same_item_in_batch_and_alone_for_every_type(engine, task_store, backbone):
    """An item surrounded by other tasks' items (one PET type each) equals the item alone."""
    rng = np.random.default_rng(2)
    names = list_tasks(task_store)
    probe = _seqs(rng, 1, backbone.spec.vocab)[0]
    for name in names:
        alone = engine.run([probe], [name])[0]
        others = _seqs(rng, 8, backbone.spec.vocab)
        batch = engine.run([*others[:4], probe, *others[4:]], [*names[:4], name, *names[-4:]])
        np.testing.assert_allclose(batch[4], alone, atol=1e-5, rtol=0, err_msg=name)


def test_text_and_ids_paths_agree(engine):
    text = np.array([[b"parameter-efficient tasks share one backbone"]], dtype=object)
    ids = engine.tokenizer.encode(text[0, 0].decode()).ids
    out = engine.execute(
        [
            {"TASK": np.array([[b"demo_lora"]], dtype=object), "TEXT": text},
            {
                "TASK": np.array([[b"demo_lora"]], dtype=object),
                "INPUT_IDS": np.array([ids], dtype=np.int64),
            },
            {
                "TASK": np.array([[b"demo_lora"]], dtype=object),
                "INPUT_IDS": np.array([ids], dtype=np.int32),
            },
        ]
    )
    assert out[0].shape == (1, 3)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)


def test_padded_layout_equals_packed(engine, task_store, backbone):
    """PetS-style padded batches cost more compute but give the same outputs."""

    rng = np.random.default_rng(3)
    names = list_tasks(task_store)
    seqs = _seqs(rng, 12, backbone.spec.vocab)
    slots = [engine.registry.tasks[names[i % len(names)]].slot for i in range(len(seqs))]
    packed = engine.encoder.batch(seqs, slots)
    padded = engine.encoder.batch(seqs, slots, pad_to=max(map(len, seqs)) + 5)
    assert padded.num_tokens > packed.num_tokens
    out_a, w_a = engine.encoder.forward(packed)
    out_b, w_b = engine.encoder.forward(padded)
    assert (w_a == w_b).all()
    np.testing.assert_allclose(out_a.numpy(), out_b.numpy(), atol=1e-5, rtol=0)


def test_maskbert_storage_forms_match_the_oracle(tmp_path, backbone, caplog):
    """A MaskBERT task served from either in-memory form (index set via seg_spmm, bit
    mask via seg_masked_mm) matches the oracle, on both op backends; ``auto`` keeps the
    smaller form (the index set for a sparse mask, the bit mask for a dense one), ``csr`` is
    the index form's old name, and the registry's debug log says which form each task took."""
    caplog.set_level(logging.DEBUG, logger="pets")
    head = HeadConfig("classification", num_labels=3)
    densities = {"mask_sparse": 0.005, "mask_dense": 0.05}
    for seed, (name, density) in enumerate(densities.items()):
        write_task(
            tmp_path, *random_task(backbone, name, "maskbert", head, seed, {"density": density})
        )
    rng = np.random.default_rng(3)
    seqs = _seqs(rng, 8, backbone.spec.vocab)
    tasks = [list(densities)[i % 2] for i in range(len(seqs))]
    want = []
    for ids, task in zip(seqs, tasks, strict=True):
        manifest, tensors = read_task(tmp_path / task)
        want.append(oracle_output(task_model(backbone, manifest, tensors), manifest, tensors, ids))
    modes = ["reference", "compiled"] if compiled_available() else ["reference"]
    for fmt, bitmap in (
        ("auto", None),  # the engine's device decides
        ("index", [False, False]),
        ("csr", [False, False]),
        ("bitmask", [True, True]),
    ):
        eng = Engine.from_parameters(
            {"TASK_STORE": str(tmp_path), "REFRESH_MS": "0", "MASKBERT_FORMAT": fmt}
        )
        assert not eng.load_errors, eng.load_errors
        method = eng.registry.methods["maskbert"]
        slots = [eng.registry.slot_of(name) for name in densities]
        if bitmap is None:  # the smaller form: indices for the sparse mask, bits for the dense
            bitmap = [False, True]
        assert [bool(method.is_bitmap.data[s]) for s in slots] == bitmap, fmt
        logged = [r.getMessage() for r in caplog.records]
        for name, as_bits in zip(densities, bitmap, strict=True):
            line = f"maskbert as {'bitmask' if as_bits else 'index'},"
            assert any(repr(name) in m and line in m for m in logged), (fmt, name, logged)
        caplog.clear()
        for mode in modes:
            eng.ctx.ops = kernels.select(mode)[0]
            for got, exp, task in zip(eng.run(seqs, tasks), want, tasks, strict=True):
                np.testing.assert_allclose(
                    got, exp, atol=ATOL, rtol=0, err_msg=f"{task} {fmt} {mode}"
                )


@pytest.fixture(scope="module")
def bitmask_engine(task_store) -> Engine:
    """The demo tasks with MaskBERT held as a bit mask: its tokens skip the shared GEMMs."""
    eng = Engine.from_parameters(
        {"TASK_STORE": str(task_store), "REFRESH_MS": "0", "MASKBERT_FORMAT": "bitmask"}
    )
    assert not eng.load_errors, eng.load_errors
    return eng


def test_one_product_maskbert_goes_last_and_equals_alone(bitmask_engine, task_store, backbone):
    """Bit-mask MaskBERT tasks compute ``X (W*M).T`` in one product: the batch puts their
    sequences last, the shared GEMMs stop before them, each row still equals its task run
    alone, and the MaskBERT rows equal the oracle."""
    eng = bitmask_engine
    rng = np.random.default_rng(5)
    names = sorted(eng.registry.tasks)
    mask_slot = eng.registry.slot_of("demo_maskbert")
    assert eng.registry.tasks["demo_maskbert"].loaded.owns_linear
    # the MaskBERT task first in caller order, and between the others
    tasks = ["demo_maskbert", *names, "demo_maskbert", *names[:3]]
    seqs = _seqs(rng, len(tasks), backbone.spec.vocab)
    batch = eng.encoder.batch(seqs, [eng.registry.slot_of(t) for t in tasks])
    n_mask = sum(t == "demo_maskbert" for t in tasks)
    tail = batch.order[-n_mask:]
    assert all(tasks[i] == "demo_maskbert" for i in tail)
    assert int(batch.seg_task_cpu[-1]) == mask_slot
    assert batch.shared_rows == batch.num_tokens - sum(len(seqs[i]) for i in tail)
    manifest, tensors = read_task(task_store / "demo_maskbert")
    model = task_model(backbone, manifest, tensors)
    modes = ["reference", "compiled"] if compiled_available() else ["reference"]
    saved = eng.ctx.ops
    try:
        for mode in modes:
            eng.ctx.ops = kernels.select(mode)[0]
            mixed = eng.run(seqs, tasks)
            for i, (ids, task) in enumerate(zip(seqs, tasks, strict=True)):
                alone = eng.run([ids], [task])[0]
                np.testing.assert_allclose(
                    mixed[i], alone, atol=1e-5, rtol=0, err_msg=f"row {i} {task} {mode}"
                )
                if task == "demo_maskbert":
                    want = oracle_output(model, manifest, tensors, ids)
                    np.testing.assert_allclose(mixed[i], want, atol=ATOL, rtol=0, err_msg=mode)
    finally:
        eng.ctx.ops = saved


def test_batch_without_the_row_order_is_refused(bitmask_engine, backbone):
    """A batch built without ``owns_linear`` would run the one-product rows through the
    shared GEMM too (doubling them): the encoder refuses it, naming the fix."""
    from pets.batch import build_batch

    eng = bitmask_engine
    seqs = _seqs(np.random.default_rng(6), 2, backbone.spec.vocab)
    slots = [eng.registry.slot_of("demo_maskbert"), eng.registry.slot_of("demo_lora")]
    batch = build_batch(seqs, slots, eng.device)
    with pytest.raises(ValueError, match=r"owns_linear=registry\.slots\.owns_linear"):
        eng.encoder.forward(batch)


def test_maskbert_format_is_checked():
    with pytest.raises(ConfigError, match=r"MASKBERT_FORMAT='bits'; expected one of auto, index"):
        EngineConfig.from_parameters({"MASKBERT_FORMAT": "bits"})


def test_qkv_bias_stays_out_of_the_gemm_when_tokens_skip_it(bitmask_engine, backbone):
    """A bit-mask MaskBERT task's tokens skip the shared GEMM, so a batch holding one keeps
    the per-segment bias pass even where every task takes the backbone's biases."""
    eng = bitmask_engine
    reg, enc = eng.registry, eng.encoder
    ids = _seqs(np.random.default_rng(4), 2, backbone.spec.vocab)
    slots = [reg.slot_of("demo_lora"), reg.slot_of("demo_maskbert")]
    prepared = enc.prepare(enc.batch(ids, slots))
    rows = reg.slots.segments(prepared.batch.seg_task_cpu)
    assert not rows.bias.any() and not (rows.scale > 0).any()  # only the GEMM rows differ
    assert prepared.batch.shared_rows < prepared.batch.num_tokens
    assert not prepared.sp.shared_bias


def test_ffn_gelu_rides_in_the_gemm_only_where_no_plan_changes_it(engine, backbone):
    """On CUDA the ffn_in bias and GELU go into the GEMM's epilogue when the batch takes the
    backbone's biases and no plan changes that GEMM's output (``SegmentParams.gelu_in_gemm``).
    Forced on here (CPU: torch computes the same op with the exact GELU), the decision follows
    the plans' ``linear_sites`` and the fused path gives the unfused path's output."""
    enc = engine.encoder
    reg = engine.registry
    ids = _seqs(np.random.default_rng(5), 2, backbone.spec.vocab)
    cases = (
        (["demo_lora"], True),  # query + value only
        (["demo_lora", "demo_adapter"], True),
        (["lora_r32"], False),  # adapts intermediate.dense: a delta before the GELU
        (["demo_lora", "demo_diff_pruning"], False),
        (["demo_bitfit"], False),  # its own biases
    )
    saved = enc.gelu_epilogue
    try:
        for tasks, want in cases:
            slots = [reg.slot_of(t) for t in tasks]
            batch = enc.batch(ids[: len(slots)], slots)
            enc.gelu_epilogue = False
            unfused = enc.prepare(batch)
            assert not unfused.sp.gelu_in_gemm
            enc.gelu_epilogue = True
            fused = enc.prepare(batch)
            assert fused.sp.gelu_in_gemm is want, tasks
            np.testing.assert_allclose(
                enc.compute(fused).numpy(), enc.compute(unfused).numpy(), atol=1e-5, rtol=0
            )
    finally:
        enc.gelu_epilogue = saved


def test_linear_sites_name_every_site_a_plan_changes(engine, task_store, backbone):
    """``linear_sites`` is the contract the fused GELU rests on: ``apply_linear`` leaves the
    GEMM output of every other site untouched, and changes the ones named."""
    enc, reg = engine.encoder, engine.registry
    ids = _seqs(np.random.default_rng(6), 1, backbone.spec.vocab)
    changed_somewhere = set()
    for name in list_tasks(task_store):
        prepared = enc.prepare(enc.batch(ids, [reg.slot_of(name)]))
        for method, plan in prepared.active:
            named = set(method.linear_sites(plan))
            for site in SITES:
                w = enc.w.linear[site][0]
                x = torch.randn(prepared.batch.num_tokens, w.shape[1])
                y = torch.zeros(prepared.batch.num_tokens, w.shape[0])
                method.apply_linear(plan, site, 0, x, y)
                moved = bool(y.abs().max() > 0)
                assert moved <= (site in named), f"{name}: {site} changed but not named"
                if moved:
                    changed_somewhere.add(method.name)
    assert {"lora", "diff_pruning", "maskbert"} <= changed_somewhere
