"""The CUDA-graph cache's policy on the CPU: when a key is captured, replayed, deferred by the
capture budget or kept eager. Graphs are faked (``_record``); tests/test_graphs.py checks real
captures on a GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from fake_graphs import FakeCache, FakeClock  # tests/ is on pythonpath

from pets.graphs import CaptureBudget, bucket_lengths, length_bucket


def _cache(clock: FakeClock, share: float = 0.05, burst_ms: float = 40.0, **kw: Any) -> FakeCache:
    return FakeCache(clock, budget=CaptureBudget(share, burst_ms, clock=clock), **kw)


STAGED = torch.zeros(2, 3)  # the batch's inputs: a graph reads them from a fixed address


def _forward(value: float) -> Callable[[], torch.Tensor]:
    """Stage ``value`` as the batch's input; the forward reads the staged buffer."""
    STAGED.fill_(value)
    return lambda: STAGED * 1.0


def test_second_sighting_captures_and_later_ones_replay() -> None:
    clock = FakeClock()
    cache = _cache(clock)
    first = cache.run("k", (), _forward(1.0), lambda: "k")
    assert cache.summary()["eager"] == 1 and cache.recorded == 0
    second = cache.run("k", (), _forward(2.0), lambda: "k")
    assert cache.captures == 1 and torch.equal(second, torch.full((2, 3), 2.0))
    # the capture's own warm-up answered: the graph was not replayed for that batch
    assert cache.graphs["k"].graph.replays == 0  # type: ignore[attr-defined]
    third = cache.run("k", (), _forward(3.0), lambda: "k")
    assert cache.replays == 1 and torch.equal(third, torch.full((2, 3), 3.0))
    assert torch.equal(first, torch.full((2, 3), 1.0))


def test_budget_defers_captures_until_time_passes() -> None:
    clock = FakeClock()
    cache = _cache(clock, share=0.05, burst_ms=40.0, capture_s=0.015)
    keys = [f"k{i}" for i in range(6)]
    for k in keys:  # first sightings: eager, nothing captured
        cache.run(k, (), _forward(0.0), lambda k=k: k)
    for k in keys:  # second sightings: the 40 ms burst pays for three 15 ms captures
        cache.run(k, (), _forward(0.0), lambda k=k: k)
    assert cache.captures == 3 and cache.deferred == 3
    # 40 ms - 3 x 15 ms spent + 5 % of the 45 ms they took
    assert cache.budget.balance_ms == pytest.approx(40.0 - 45.0 + 2.25)
    clock.now += 0.5  # +25 ms: 22.25 pays k3 (7.25 left); +0.75 starts k4 (-7.0); k5 waits
    for k in keys[3:]:
        cache.run(k, (), _forward(0.0), lambda k=k: k)
    assert cache.captures == 5 and cache.deferred == 4
    assert set(cache.graphs) == {"k0", "k1", "k2", "k3", "k4"}
    s = cache.summary()
    assert s["capture_ms"] == pytest.approx(5 * 15.0) and s["graphs"] == 5


def test_budget_share_bounds_a_long_run() -> None:
    """Every batch a new-ish shape seen twice: capturing takes at most ~share of the run."""
    clock = FakeClock()
    cache = _cache(clock, share=0.05, burst_ms=40.0, capture_s=0.015, max_graphs=1000)
    for i in range(4000):
        clock.now += 0.004  # a 4 ms eager forward
        k = i // 2  # each key seen twice in a row
        cache.run(k, (), _forward(0.0), lambda k=k: k)
    spent = cache.summary()["capture_ms"] / 1e3
    assert spent <= 0.05 * clock.now + 0.04 + 0.015
    assert cache.captures > 0 and cache.deferred > 0


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="share"):
        CaptureBudget(share=0.0)
    with pytest.raises(ValueError, match="burst_ms"):
        CaptureBudget(burst_ms=-1)


def test_lru_drops_the_oldest_graph() -> None:
    clock = FakeClock()
    cache = _cache(clock, burst_ms=1000.0, max_graphs=2, min_sightings=1)
    for k in ("a", "b", "a", "c"):
        cache.run(k, (), _forward(0.0), lambda k=k: k)
    assert list(cache.graphs) == ["a", "c"]  # "a" replayed, so "b" was the oldest


def test_moved_key_and_no_key_stay_eager() -> None:
    clock = FakeClock()
    cache = _cache(clock, min_sightings=1)
    out = cache.run("k", (), _forward(5.0), lambda: "other")  # the warm-up changed the key
    assert torch.equal(out, torch.full((2, 3), 5.0))
    assert "k" in cache.failed and not cache.graphs
    cache.run("k", (), _forward(0.0), lambda: "k")
    assert cache.recorded == 1 and cache.eager == 2  # never recorded again
    cache.run(None, (), _forward(0.0), lambda: None)
    assert cache.recorded == 1 and cache.eager == 3


def test_warming_captures_first_sightings_outside_the_budget() -> None:
    clock = FakeClock()
    cache = _cache(clock, burst_ms=1.0)  # a budget of one 15 ms capture, then none for 300 ms
    with cache.warming():
        for k in ("a", "b", "c"):
            cache.run(k, (), _forward(0.0), lambda k=k: k)
    assert cache.captures == 3 and cache.eager == 0 and cache.deferred == 0
    assert cache.min_sightings == 2  # afterwards: captured on the second sighting again...
    cache.run("d", (), _forward(0.0), lambda: "d")
    assert cache.captures == 3 and cache.eager == 1
    cache.run("d", (), _forward(0.0), lambda: "d")  # ...and charged to the serving budget,
    assert cache.captures == 4 and cache.budget.balance_ms < 0  # which warming left alone
    cache.run("e", (), _forward(0.0), lambda: "e")
    cache.run("e", (), _forward(0.0), lambda: "e")
    assert cache.captures == 4 and cache.deferred == 1


def test_state_change_drops_graphs() -> None:
    clock = FakeClock()
    cache = _cache(clock, min_sightings=1)
    cache.run("k", ("pools", 1), _forward(0.0), lambda: "k")
    assert cache.graphs
    cache.run("k", ("pools", 2), _forward(0.0), lambda: "k")  # captured again under the new state
    assert cache.captures == 2 and cache.replays == 0


def test_length_buckets_give_nearby_lengths_one_shape() -> None:
    # powers of two and 1.5x them from 16: under a third of a bucket is padding above 16
    assert [length_bucket(n, 512) for n in (1, 5, 17, 20, 25, 33, 100, 129, 300)] == [
        16, 16, 24, 24, 32, 48, 128, 192, 384,
    ]  # fmt: skip
    for n in range(17, 513):
        b = length_bucket(n, 512)
        assert n <= b <= 512 and (b - n) * 3 < b, (n, b)
    # a sequence already in shape keeps its bucket: the padded layout (no pads), one graph
    # with every shorter length of the bucket
    assert length_bucket(24, 512) == 24 and length_bucket(128, 128) == 128
    assert length_bucket(300, 320) == 320  # 384 would exceed MAX_SEQ_LEN


def test_bucket_lengths_list_every_padded_shape() -> None:
    assert bucket_lengths(128) == [16, 24, 32, 48, 64, 96, 128]
    assert bucket_lengths(100) == [16, 24, 32, 48, 64, 96, 100]
    assert bucket_lengths(10) == [10]
    for m in (10, 100, 128, 300, 512):  # every length lands in a listed bucket
        assert sorted({length_bucket(n, m) for n in range(1, m + 1)}) == bucket_lengths(m)
