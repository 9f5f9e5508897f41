"""The engine's staged path on a CPU stand-in: one staged copy per forward, and a batch like a
recent one reusing its plans with only its token ids restaged. On a GPU this is the serving
path (the CPU normally stages nothing); here a CPU buffer plays the device buffer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_graphs import FakeCache, FakeClock  # tests/ is on pythonpath

from pets.engine import Engine
from pets.staging import Stager


def _requests(tasks: list[str], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "TASK": np.array([[t.encode()]], dtype=object),
            "INPUT_IDS": rng.integers(1000, 2000, size=(1, 5 + i % 4), dtype=np.int64),
        }
        for i, t in enumerate(tasks)
    ]


@contextmanager
def _counting_prepare(eng: Engine) -> Iterator[dict[str, int]]:
    """Counts the engine's planning calls (``encoder.prepare``) while the block runs."""
    calls = {"prepare": 0}
    prepare = eng.encoder.prepare

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["prepare"] += 1
        return prepare(*args, **kwargs)

    eng.encoder.prepare = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        eng.encoder.prepare = prepare  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def staged(task_store: Path) -> Any:
    eng = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    eng.stager = Stager(torch.device("cpu"), capacity=1 << 12, enabled=True)  # grows once
    yield eng
    eng.close()


def test_staged_and_reused_batches_equal_the_plain_engine(staged: Any, engine: Any) -> None:
    names = sorted(engine.registry.tasks)
    layouts = [names] + [[n, n] for n in names[:3]]  # a mixed batch, single-task batches
    with _counting_prepare(staged) as calls:
        for layout in layouts:
            for seed in range(3):  # the same tasks and lengths, new token ids each time
                before = calls["prepare"]
                reqs = _requests(layout, seed)
                got, want = staged.execute(reqs), engine.execute(reqs)
                for g, w in zip(got, want, strict=True):
                    assert isinstance(g, np.ndarray), g
                    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
                if seed:  # a repeat reuses the plans of the first: nothing is planned again
                    assert calls["prepare"] == before, (layout, seed)
                else:
                    assert calls["prepare"] > before
    assert staged.stager.epoch > 1  # the tiny stage grew, and the batches still agreed


def test_a_registry_change_drops_reused_plans(staged: Any, engine: Any) -> None:
    names = sorted(engine.registry.tasks)[:2]
    reqs = _requests(names, 0)
    staged.execute(reqs)
    version = staged.registry.version
    entry = staged.registry.tasks[names[0]]
    staged.registry.add(entry.manifest, _tensors_of(staged, names[0]), entry.mtime_ns)
    assert staged.registry.version > version
    got, want = staged.execute(reqs), engine.execute(reqs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def _tensors_of(eng: Engine, name: str) -> dict[str, torch.Tensor]:
    from pets.taskstore import read_task

    _, tensors = read_task(eng.store / name)
    return tensors


def test_reused_layouts_with_token_types_equal_the_plain_engine(staged: Any, engine: Any) -> None:
    """Token types that are all 0 stage nothing, as if absent, so a reused layout restages
    only the ids; nonzero types are restaged as the second array. ``Engine.run`` takes any
    per-row types (the request decoder already drops all-zero rows), and every repeat
    equals the plain engine (a mismatch would restage zeros over the positions)."""
    names = sorted(engine.registry.tasks)[:2]
    rng = np.random.default_rng(7)
    for fill in (0, 1):
        for _ in range(3):  # same tasks and lengths: the second and third reuse the plans
            ids = [rng.integers(1000, 2000, size=6 + k) for k in range(len(names))]
            types = []
            for x in ids:
                t = np.zeros_like(x)
                t[2:] = fill
                types.append(t)
            got = staged.run(ids, names, types)
            want = engine.run(ids, names, types if fill else None)
            for g, w in zip(got, want, strict=True):
                assert isinstance(g, np.ndarray), g
                np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bucketed(task_store: Path) -> Any:
    """The staged engine with one-sequence batches padded to a length bucket, as with CUDA
    graphs."""
    eng = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    eng.stager = Stager(torch.device("cpu"), capacity=1 << 12, enabled=True)
    eng.length_buckets = True
    yield eng
    eng.close()


def test_length_bucketed_requests_equal_the_plain_engine(bucketed: Any, engine: Any) -> None:
    """A request of 5-8 tokens pads to 16 (one shape, so one graph on a GPU); the pads change
    no output, and a repeat of the same task and length reuses the padded plans. Batches of
    several sequences stay packed."""
    with _counting_prepare(bucketed) as calls:
        for name in sorted(engine.registry.tasks):
            for seed in range(3):
                before = calls["prepare"]
                reqs = _requests([name], seed)  # one row of 5 tokens: the same every seed
                got, want = bucketed.execute(reqs), engine.execute(reqs)
                assert isinstance(got[0], np.ndarray), got
                np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
                assert (calls["prepare"] == before) == (seed > 0), (name, seed)
    slot = bucketed.registry.tasks[sorted(engine.registry.tasks)[0]].slot
    one = [np.arange(1000, 1007)]
    batch = bucketed._prepare(one, [slot], bucketed._bucket(one)).batch
    assert (batch.num_tokens, batch.max_seqlen, batch.valid_lens_cpu.tolist()) == (16, 16, [7])
    two = [np.arange(1000, 1007), np.arange(1000, 1005)]
    assert bucketed._bucket(two) == 0  # several sequences stay packed
    full = [np.arange(1000, 1016)]  # fills its bucket: the padded layout, with no pads
    assert bucketed._bucket(full) == 16
    batch = bucketed._prepare(full, [slot], 16).batch
    assert (batch.num_tokens, batch.valid_lens_cpu.tolist()) == (16, [16])
    got = bucketed.run(full, [sorted(engine.registry.tasks)[0]])
    np.testing.assert_allclose(got[0], engine.run(full, [sorted(engine.registry.tasks)[0]])[0],
                               atol=1e-5, rtol=0)  # fmt: skip


def test_one_request_reuses_its_buckets_plans_at_any_length(
    task_store: Path, backbone: Any
) -> None:
    """Requests of 17-23 tokens all pad to 24: after the first, their plans are reused and
    only the ids and the valid length are staged anew; every answer equals the plain
    engine's (mean pooling reads the valid length). A token-classification task, whose
    output rows depend on the length, plans each new length."""
    from pets.heads import HeadConfig
    from pets.taskgen import random_task

    plain = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    eng = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    try:
        eng.stager = Stager(torch.device("cpu"), capacity=1 << 12, enabled=True)
        eng.length_buckets = True
        heads = {
            "mean_lora": ("lora", HeadConfig("embedding", pooling="mean")),
            "tok_bitfit": ("bitfit", HeadConfig("token_classification", num_labels=3)),
        }
        for seed, (name, (pet, head)) in enumerate(heads.items()):
            m, t = random_task(backbone, name, pet, head, seed=40 + seed)
            for e in (eng, plain):
                e.registry.add(m, t)
        rng = np.random.default_rng(21)
        for name in [*sorted(task_store_names(task_store)), *heads]:
            with _counting_prepare(eng) as calls:
                for k, n in enumerate((17, 23, 20, 18)):
                    req = {
                        "TASK": np.array([[name.encode()]], dtype=object),
                        "INPUT_IDS": rng.integers(1000, 2000, size=(1, n), dtype=np.int64),
                    }
                    (got,), (want,) = eng.execute([req]), plain.execute([req])
                    assert isinstance(got, np.ndarray) and got.shape == want.shape, got
                    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
                    if name == "tok_bitfit":
                        assert calls["prepare"] == k + 1, (name, n)
                    else:
                        assert calls["prepare"] == 1, (name, n)
    finally:
        eng.close()
        plain.close()


def task_store_names(store: Path) -> list[str]:
    return [p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_length_bucketed_reuse_restages_padded_token_types(bucketed: Any, engine: Any) -> None:
    name = sorted(engine.registry.tasks)[0]
    rng = np.random.default_rng(11)
    for n in (9, 12, 14):  # one bucket: the second and third reuse the plans and restage
        ids = [rng.integers(1000, 2000, size=n)]  # ids, types and the valid length
        types = [np.r_[np.zeros(3, np.int64), np.ones(n - 3, np.int64)]]
        (got,), (want,) = bucketed.run(ids, [name], types), engine.run(ids, [name], types)
        assert isinstance(got, np.ndarray), got
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_warm_up_captures_one_request_shapes_that_requests_then_replay(
    task_store: Path, engine: Any
) -> None:
    """The start-up warm-up on a CPU stand-in of the graph path (staged buffer, faked
    graphs that re-run the captured forward): one capture per task kind and length bucket;
    a later request of a warmed length is replayed, never captured, and its answer is the
    plain engine's (so the replay reads only what the new request staged)."""
    eng = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    try:
        eng.stager = Stager(torch.device("cpu"), capacity=1 << 12, enabled=True)
        eng.graphs = FakeCache(FakeClock())
        eng.length_buckets = True
        kinds = {(e.manifest.pet_type, e.manifest.head.kind) for e in eng.registry.tasks.values()}
        got = eng.warm_graphs(48)  # buckets 16, 24, 32, 48
        assert got["captures"] == len(kinds) * 4 and got["replays"] == 0, got
        reps: dict[tuple[str, str], str] = {}  # the warmed task of each kind
        for name in sorted(eng.registry.tasks):
            m = eng.registry.tasks[name].manifest
            reps.setdefault((m.pet_type, m.head.kind), name)
        rng = np.random.default_rng(3)
        for n in (24, 9, 40):  # buckets 24 (filled: no pads), 16, 48
            for name in sorted(eng.registry.tasks):
                req = {
                    "TASK": np.array([[name.encode()]], dtype=object),
                    "INPUT_IDS": rng.integers(1000, 2000, size=(1, n), dtype=np.int64),
                }
                replays = eng.graphs.replays
                (got_out,), (want,) = eng.execute([req]), engine.execute([req])
                assert isinstance(got_out, np.ndarray), got_out
                np.testing.assert_allclose(got_out, want, atol=1e-5, rtol=0)
                if name in reps.values():
                    assert eng.graphs.replays == replays + 1, (name, n)
        # other tasks of a kind replay its graphs when their plans agree (a LoRA task of
        # another rank does not); a one-off shape is never captured
        after = eng.graphs.summary()
        assert after["captures"] == got["captures"], (got, after)
        assert after["replays"] >= 3 * len(reps), after
    finally:
        eng.close()


def test_warm_up_leaves_a_quarter_of_the_cache_and_warms_short_requests_first(
    task_store: Path,
) -> None:
    eng = Engine.from_parameters({"TASK_STORE": str(task_store), "REFRESH_MS": "0"})
    try:
        eng.stager = Stager(torch.device("cpu"), capacity=1 << 12, enabled=True)
        eng.graphs = FakeCache(FakeClock(), max_graphs=8)
        eng.length_buckets = True
        kinds = {(e.manifest.pet_type, e.manifest.head.kind) for e in eng.registry.tasks.values()}
        assert len(kinds) > 3  # so 6 graphs cannot cover two buckets of every kind
        ran: list[int] = []
        run = eng.run

        def recording(ids: Any, tasks: Any, types: Any = None) -> Any:
            ran.append(len(ids[0]))
            return run(ids, tasks, types)

        eng.run = recording  # type: ignore[method-assign]
        assert eng.warm_graphs(128)["captures"] == 6
        assert set(ran) == {16}, ran  # the 16-token bucket first, for as many kinds as fit
    finally:
        eng.close()


def test_warm_up_is_off_without_graphs_and_refuses_a_negative_length() -> None:
    from pets.engine import EngineConfig
    from pets.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^GRAPH_WARMUP=-1; expected 0 \(off\)"):
        EngineConfig.from_parameters({"GRAPH_WARMUP": "-1"})


def test_kept_plans_stay_within_their_byte_budget(
    staged: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pets.engine as engine_module

    names = sorted(engine.registry.tasks)
    staged.execute(_requests(names[:1], 0))
    one = next(reversed(staged._templates.values())).nbytes
    monkeypatch.setattr(engine_module, "_MAX_TEMPLATE_BYTES", 3 * one)
    for k, name in enumerate(names):  # one-task batches of similar size, each a new plan
        got, want = staged.execute(_requests([name], k)), engine.execute(_requests([name], k))
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    kept = list(staged._templates.values())
    assert 1 <= len(kept) <= 4, len(kept)
    assert staged._template_bytes == sum(t.nbytes for t in kept)
    assert staged._template_bytes <= 3 * one * 1.5  # the newest may be a little bigger
