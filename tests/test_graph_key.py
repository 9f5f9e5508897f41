"""graph_key: what a captured forward bakes in (CPU stand-ins for the staged buffer)."""

from __future__ import annotations

import dataclasses

import torch

from pets.graphs import HOST_ONLY, graph_key


@dataclasses.dataclass
class Plan:
    max_rank: int
    rows: torch.Tensor  # host: its values are baked into launches
    tables: torch.Tensor = dataclasses.field(metadata={HOST_ONLY: True})


STAGED = torch.zeros(8)


def test_host_scalars_and_host_tensor_values_are_in_the_key() -> None:
    a = graph_key(Plan(16, torch.tensor([1, 2]), torch.zeros(1)), STAGED)
    assert a is not None
    assert a == graph_key(Plan(16, torch.tensor([1, 2]), torch.zeros(1)), STAGED)
    assert a != graph_key(Plan(32, torch.tensor([1, 2]), torch.zeros(1)), STAGED)
    assert a != graph_key(Plan(16, torch.tensor([1, 3]), torch.zeros(1)), STAGED)
    assert a != graph_key(Plan(16, torch.tensor([1, 2], dtype=torch.int32), torch.zeros(1)), STAGED)


def test_host_only_fields_are_left_out() -> None:
    a = graph_key(Plan(16, torch.tensor([1]), torch.zeros(3)), STAGED)
    assert a == graph_key(Plan(16, torch.tensor([1]), torch.ones(7)), STAGED)


def test_containers_and_dtypes_walk_unknown_objects_refuse() -> None:
    layout = [(torch.int32, (3,)), (torch.float16, (2, 4))]
    key = graph_key((layout, {"qkv": [1, 2.5, None]}), STAGED)
    assert key is not None and "torch.float16" in key
    assert graph_key((object(),), STAGED) is None  # cannot say what it bakes in: no graph
