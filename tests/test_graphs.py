"""CUDA-graph replay equals eager execution: every PET type, mixed batches, new contents in
a known shape, and task lifecycle changes that move the pools (CUDA only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pets.backbone import load_backbone
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import write_task

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


BACKBONE = "bert-base-6l"  # random weights: the GPU host has no checkpoint to read


def _engine(store: Path, graphs: int, warmup: int = 0) -> Engine:
    """Warm-up off unless asked: these tests count the captures their own batches cause."""
    eng = Engine.from_parameters(
        {"BACKBONE": BACKBONE, "TASK_STORE": str(store), "REFRESH_MS": "0",
         "CUDA_GRAPHS": str(graphs), "GRAPH_WARMUP": str(warmup)},
        device="cuda",
    )  # fmt: skip
    assert not eng.load_errors, eng.load_errors
    eng.length_buckets = True  # eager engines too: graph and eager runs share one layout
    return eng


@pytest.fixture(scope="module")
def weights() -> Any:
    return load_backbone(BACKBONE)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, weights: Any) -> Path:
    """One classification task of every registered PET type, and an embedding task."""
    root = tmp_path_factory.mktemp("graph_store")
    for seed, pet in enumerate(sorted(pet_types())):
        m, t = random_task(weights, f"t_{pet}", pet, HeadConfig("classification", num_labels=3),
                           seed=seed)  # fmt: skip
        write_task(root, m, t)
    m, t = random_task(weights, "emb_lora", "lora", HeadConfig("embedding", pooling="mean"),
                       seed=99)  # fmt: skip
    write_task(root, m, t)
    return root


def _requests(tasks: list[str], seed: int, length: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "TASK": np.array([[t.encode()]], dtype=object),
            "INPUT_IDS": rng.integers(1000, 2000, size=(1, length + i % 3), dtype=np.int64),
        }
        for i, t in enumerate(tasks)
    ]


def _same(graph_out: list[Any], eager_out: list[Any]) -> None:
    """Replay vs eager: the same kernels on the same inputs, so the same values."""
    assert len(graph_out) == len(eager_out)
    for g, e in zip(graph_out, eager_out, strict=True):
        assert isinstance(g, np.ndarray) and isinstance(e, np.ndarray), (g, e)
        np.testing.assert_allclose(g, e, rtol=2e-3, atol=2e-3)


def _close(batched: np.ndarray, alone: np.ndarray) -> None:
    """A row of a mixed fp16 batch vs the same sequence alone (other GEMM shapes, so other
    roundings): the project's GPU parity bound, cosine >= 0.9999."""
    a, b = batched.ravel().astype(np.float64), alone.ravel().astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos >= 0.9999, (cos, batched, alone)


@pytest.fixture(scope="module")
def engines(store: Path) -> Any:
    graphed, eager = _engine(store, 1), _engine(store, 0)
    yield graphed, eager
    graphed.close()
    eager.close()


def test_every_task_replays_like_eager(engines: Any) -> None:
    graphed, eager = engines
    for name in sorted(graphed.registry.tasks):
        for seed in range(3):  # eager, captured, replayed; new token ids every time
            reqs = _requests([name, name], seed)
            _same(graphed.execute(reqs), eager.execute(reqs))
    stats = graphed.graphs.summary()
    print(stats)
    assert stats["replays"] > 0 and stats["captures"] > 0


def test_mixed_batch_replays_like_eager_and_alone(engines: Any) -> None:
    graphed, eager = engines
    names = sorted(graphed.registry.tasks)
    before = graphed.graphs.summary()["replays"]
    for seed in range(4):
        reqs = _requests(names, seed)
        mixed = graphed.execute(reqs)
        _same(mixed, eager.execute(reqs))
        if seed == 3:  # the replayed mixed batch equals each task run alone
            for req, out in zip(reqs, mixed, strict=True):
                (alone,) = eager.execute([req])
                assert isinstance(alone, np.ndarray)
                _close(out, alone)
    assert graphed.graphs.summary()["replays"] > before


def test_pools_moving_drops_graphs(store: Path, tmp_path: Path, weights: Any) -> None:
    private = tmp_path / "store"
    for folder in store.iterdir():  # a private copy: this test adds tasks
        if folder.is_dir() and not folder.name.startswith("."):
            dest = private / folder.name
            dest.mkdir(parents=True)
            for f in folder.iterdir():
                (dest / f.name).write_bytes(f.read_bytes())
    store = private
    graphed, eager = _engine(store, 1), _engine(store, 0)
    try:
        names = ["t_lora", "t_adapter", "t_bitfit"]
        for seed in range(3):
            _same(graphed.execute(_requests(names, seed)), eager.execute(_requests(names, seed)))
        state = graphed._state_key()
        for i in range(40):  # enough LoRA weights to grow the pool (it moves)
            m, t = random_task(
                weights,
                f"grow{i}",
                "lora",
                HeadConfig("classification", num_labels=3),
                seed=500 + i,
                hparams={"r": 16, "target_modules": ["query", "value", "output.dense"]},
            )
            write_task(store, m, t)
        graphed.maybe_refresh(force=True)
        eager.maybe_refresh(force=True)
        assert graphed._state_key() != state, "the pools did not move; grow more tasks"
        before = graphed.graphs.summary()
        for seed in range(3):
            reqs = _requests([*names, "grow7", "grow31"], seed)
            _same(graphed.execute(reqs), eager.execute(reqs))
        after = graphed.graphs.summary()  # graphs are captured again after the move
        assert after["captures"] == before["captures"] + 1, (before, after)
        assert after["replays"] == before["replays"] + 1, (before, after)
        assert not graphed.graphs.failed
    finally:
        graphed.close()
        eager.close()


def test_nearby_lengths_replay_one_graph(store: Path, engines: Any) -> None:
    """Single requests of 17-24 tokens all pad to the 24-token bucket (24 itself with no
    pads): one capture, replays from then on, each equal to eager on the same padded layout
    and close to the packed one."""
    _, eager = engines
    graphed = _engine(store, 1)  # a fresh capture budget: earlier tests may have spent it
    rng = np.random.default_rng(5)
    try:
        for name in ("t_lora", "emb_lora", "t_maskbert"):
            before = graphed.graphs.summary()
            for n in (17, 20, 24, 18, 21, 19, 23):
                ids = rng.integers(1000, 2000, size=(1, n), dtype=np.int64)
                req = [{"TASK": np.array([[name.encode()]], dtype=object), "INPUT_IDS": ids}]
                (got,) = graphed.execute(req)
                (same,) = eager.execute(req)  # the same padded layout, run eagerly
                eager.length_buckets = False
                try:
                    (packed,) = eager.execute(req)
                finally:
                    eager.length_buckets = True
                _same([got], [same])
                _close(got, packed)
            after = graphed.graphs.summary()
            print(name, after)
            assert after["captures"] - before["captures"] == 1, (name, before, after)
            assert after["replays"] - before["replays"] == 5, (name, before, after)
    finally:
        graphed.close()


def test_warm_up_captures_at_start_and_requests_replay(store: Path, engines: Any) -> None:
    _, eager = engines
    graphed = _engine(store, 1, warmup=48)  # buckets 16, 24, 32, 48
    try:
        kinds = {(e.manifest.pet_type, e.manifest.head.kind)
                 for e in graphed.registry.tasks.values()}  # fmt: skip
        warm = graphed.graphs.summary()
        print(warm)
        assert warm["captures"] == 4 * len(kinds) and warm["replays"] == 0, warm
        rng = np.random.default_rng(9)
        for n in (20, 40, 48):  # 48 fills its bucket: the warmed graph serves it too
            ids = rng.integers(1000, 2000, size=(1, n), dtype=np.int64)
            req = [{"TASK": np.array([[b"t_lora"]], dtype=object), "INPUT_IDS": ids}]
            _same(graphed.execute(req), eager.execute(req))
        after = graphed.graphs.summary()
        assert after["replays"] == 3 and after["captures"] == warm["captures"], after
    finally:
        graphed.close()
