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


def test_staged_views_give_their_place_not_their_values() -> None:
    """The staged buffer is rewritten before every replay: a view of it is keyed by where
    it sits (offset, shape, stride), so new contents in the same place share the key."""
    view = STAGED[2:5]
    a = graph_key(Plan(16, view, torch.zeros(1)), STAGED)
    STAGED[2:5] = torch.tensor([7.0, 8.0, 9.0])
    assert a is not None and a == graph_key(Plan(16, view, torch.zeros(1)), STAGED)
    assert a != graph_key(Plan(16, STAGED[3:6], torch.zeros(1)), STAGED)
    assert a != graph_key(Plan(16, view.clone(), torch.zeros(1)), STAGED)  # host: values
    STAGED.zero_()
