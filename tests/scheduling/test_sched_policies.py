"""Contract of every policy, registry selection and option errors."""

from __future__ import annotations

import numpy as np
import pytest
from sched_helpers import random_queries, random_table

from pets.errors import ConfigError
from pets.scheduling import (
    DEFAULT_POLICY,
    AnalyticModel,
    Query,
    available_policies,
    make_scheduler,
    validate_schedule,
)
from pets.scheduling.policies import CoordinatedScheduler

ALL = ["fixed", "alpha_only", "beta_only", "coordinated", "token_budget", "task_grouped"]
OPTIONS: list[dict] = [{}, {"max_batch_size": 5}, {"max_batch_tokens": 64}]


def options_for(name: str, opts: dict) -> dict:
    if name == "fixed" and "max_batch_size" in opts:
        return {"batch_size": 7}
    return opts


def test_registry_lists_all_policies():
    assert set(available_policies()) == set(ALL)
    assert DEFAULT_POLICY in available_policies()
    for name in ALL:
        assert make_scheduler(name).name == name


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("n,n_tasks", [(0, 1), (1, 1), (37, 1), (200, 5), (300, 64)])
def test_every_query_exactly_once_grouped_by_task(name, opts, n, n_tasks):
    rng = np.random.default_rng(n * 31 + n_tasks)
    qs = random_queries(rng, n, n_tasks, max_len=128)
    batches = make_scheduler(name, **options_for(name, opts)).schedule(qs)
    validate_schedule(qs, batches)
    if n == 0:
        assert batches == []
    by = {q.index: q for q in qs}
    for b in batches:
        lens = [by[i].length for i in b.indices]
        if name in ("token_budget", "task_grouped"):  # the packed (padding-free) policies
            assert b.padded_length == 0
        else:
            assert b.padded_length == max(lens)
        size_cap = opts.get("max_batch_size")
        if name == "fixed" and size_cap:
            size_cap = 7
        if size_cap:
            assert len(b) <= size_cap
        tok_cap = opts.get("max_batch_tokens")
        if tok_cap and len(b) > 1:
            used = sum(lens) if b.padded_length == 0 else len(b) * max(lens)
            assert used <= tok_cap


def test_indices_follow_caller_positions_not_list_order():
    qs = [Query(10, 1, "lora", 5), Query(3, 0, "ia3", 9), Query(7, 1, "lora", 4)]
    for name in ALL:
        batches = make_scheduler(name).schedule(qs)
        validate_schedule(qs, batches)
        assert sorted(i for b in batches for i in b.indices) == [3, 7, 10]


def test_fixed_keeps_the_remainder_in_arrival_order():
    qs = [Query(i, i % 3, "bitfit", 1 + i % 5) for i in range(70)]
    batches = make_scheduler("fixed", batch_size=32).schedule(qs)
    assert [len(b) for b in batches] == [32, 32, 6]
    assert sorted(batches[2].indices) == list(range(64, 70))
    # grouped by task inside the batch, stable: task order of first appearance
    assert batches[2].indices == (64, 67, 65, 68, 66, 69)


def test_every_policy_takes_the_engine_token_limit():
    """The engine passes max_batch_tokens to whatever policy config.pbtxt names."""
    qs = [Query(i, i % 3, "lora", 20 + i % 7) for i in range(100)]
    for name in ALL:
        batches = make_scheduler(name, max_batch_tokens=256).schedule(qs)
        validate_schedule(qs, batches)
        by = {q.index: q for q in qs}
        for b in batches:
            lens = [by[i].length for i in b.indices]
            assert (sum(lens) if b.padded_length == 0 else len(lens) * max(lens)) <= 256
    fixed = make_scheduler("fixed", batch_size=32, max_batch_tokens=256).schedule(qs)
    assert [i for b in fixed for i in sorted(b.indices)] == list(range(100))  # arrival order


def test_task_grouped_is_one_batch_unless_over_cap():
    qs = [Query(i, i % 4, "adapter", 10) for i in range(40)]
    (b,) = make_scheduler("task_grouped").schedule(qs)
    assert b.indices[:10] == tuple(range(0, 40, 4))
    split = make_scheduler("task_grouped", max_batch_tokens=100, packed=False).schedule(qs)
    assert [len(x) for x in split] == [10, 10, 10, 10]
    assert all(x.padded_length == 10 for x in split)
    packed = make_scheduler("task_grouped", max_batch_tokens=100).schedule(qs)
    assert all(x.padded_length == 0 for x in packed)


def test_oversized_single_query_still_scheduled():
    qs = [Query(0, 0, "lora", 500), Query(1, 0, "lora", 3)]
    for name in ["alpha_only", "beta_only", "coordinated", "token_budget", "task_grouped"]:
        batches = make_scheduler(name, max_batch_tokens=100).schedule(qs)
        validate_schedule(qs, batches)
        assert len(batches) == 2


def test_coordinated_mixes_tasks_and_beats_fixed_on_its_cost_model():
    """Sanity: on the analytic model, CB's batches cost less than fixed batching."""
    from pets.scheduling import batch_cost

    rng = np.random.default_rng(0)
    qs = random_queries(rng, 256, n_tasks=32, max_len=64)
    by = {q.index: q for q in qs}
    model = AnalyticModel()

    def cost(policy):
        return sum(
            batch_cost(model, [by[i] for i in b.indices], b.padded_length)
            for b in policy.schedule(qs)
        )

    cb = CoordinatedScheduler(model)
    assert cost(cb) < cost(make_scheduler("fixed", batch_size=32))
    assert any(len({by[i].task_slot for i in b.indices}) > 1 for b in cb.schedule(qs))


def test_coordinated_takes_a_cost_table():
    rng = np.random.default_rng(2)
    table = random_table(rng, monotone=True)
    qs = random_queries(rng, 50, n_tasks=6)
    sched = make_scheduler("coordinated", cost_model=table, max_minibatch_size=4, merge_beta=False)
    validate_schedule(qs, sched.schedule(qs))
    assert sched.describe()["merge_beta"] is False


def test_bad_policy_name_message():
    with pytest.raises(ConfigError) as e:
        make_scheduler("coordinate")
    msg = str(e.value)
    assert "'coordinate'" in msg
    for name in ALL:
        assert name in msg
    assert "config.pbtxt" in msg


def test_bad_option_name_and_value():
    with pytest.raises(ConfigError, match=r"batch_sise.*valid options: batch_size, max_batch"):
        make_scheduler("fixed", batch_sise=3)
    with pytest.raises(ConfigError, match="batch_size=0"):
        make_scheduler("fixed", batch_size=0)
    with pytest.raises(ConfigError, match="max_batch_tokens=-5"):
        make_scheduler("token_budget", max_batch_tokens=-5)
    with pytest.raises(ConfigError, match="cost_model"):
        make_scheduler("alpha_only", cost_model=42)
    with pytest.raises(ConfigError, match=r"no/such/table\.json"):
        make_scheduler("alpha_only", cost_model="no/such/table.json")
    with pytest.raises(ConfigError, match="merge_beta='maybe'"):
        make_scheduler("coordinated", merge_beta="maybe")


def test_string_options_from_config_pbtxt(tmp_path):
    """config.pbtxt parameters arrive as strings."""
    assert make_scheduler("fixed", batch_size="16").describe()["batch_size"] == 16
    s = make_scheduler("coordinated", max_batch_size="64", merge_beta="false")
    assert s.describe()["max_batch_size"] == 64 and s.describe()["merge_beta"] is False
    assert make_scheduler("task_grouped", packed="true").describe()["packed"] is True
    table = random_table(np.random.default_rng(0), monotone=True)
    table.save(tmp_path / "t.json")
    s = make_scheduler("coordinated", cost_model=str(tmp_path / "t.json"))
    assert s.describe()["cost_model"] == "CostTable"


def test_every_policy_builds_from_the_engine_context() -> None:
    from pets.scheduling import AnalyticModel, SchedulerContext, scheduler_from_context

    built: list[str] = []

    def cost_model() -> AnalyticModel:
        built.append("cost")
        return AnalyticModel()

    for name in available_policies():
        built.clear()
        ctx = SchedulerContext(max_batch_tokens=512, batch_size=4, cost_model=cost_model)
        sched = scheduler_from_context(name, ctx)
        assert sched.name == name
        uses_costs = name in ("alpha_only", "beta_only", "coordinated")
        assert built == (["cost"] if uses_costs else []), name
        limits = sched.describe()
        assert limits.get("max_batch_tokens", 512) == 512, (name, limits)
        size = limits.get("batch_size", limits.get("max_batch_size"))
        assert size == 4, (name, limits)
