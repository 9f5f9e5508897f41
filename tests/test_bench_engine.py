"""bench_engine's --configs: a subset of its configs, refused with the known labels named."""

from __future__ import annotations

import pytest

from clients.bench.bench_engine import CONFIGS, MIX, parse_configs


def test_all_is_every_config_in_order() -> None:
    assert parse_configs("all") == list(CONFIGS)
    labels = list(CONFIGS)
    assert labels[0] == "backbone_only" and labels[-1] == "mixed"
    assert CONFIGS["mixed"] == list(MIX) and "none" not in MIX


def test_a_subset_keeps_the_given_order() -> None:
    assert parse_configs("mixed, lora,backbone_only") == ["mixed", "lora", "backbone_only"]


@pytest.mark.parametrize("bad", ["", ",", "lora,nope", "LoRA"])
def test_unknown_or_empty_configs_are_refused(bad: str) -> None:
    with pytest.raises(SystemExit, match="--configs") as info:
        parse_configs(bad)
    assert "backbone_only" in str(info.value)
