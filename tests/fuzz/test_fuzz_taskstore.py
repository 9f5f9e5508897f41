"""Fuzz the task-store loader: manifests (any JSON, and valid ones with one field replaced),
safetensors bytes (random, truncated, bit-flipped, with a forged header), and whole task
folders through read_task and the registry's full validation.

Property: a task is accepted or refused with TaskError and a short message; nothing else
escapes (no crash of the instance that loads the store), nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from pets.errors import TaskError
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import MANIFEST, WEIGHTS, TaskManifest, read_task, weights_from_bytes
from pets.validate import scratch_registry

from .conftest import budget

MESSAGE_LIMIT = 600

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.text(min_size=1000, max_size=1100),  # long values: messages must still be short
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid(backbone: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    m, t = random_task(backbone, "fz", "lora", HeadConfig("classification", num_labels=2), seed=5)
    return m.to_json(), t


@pytest.fixture(scope="module")
def registry(backbone: Any) -> Any:
    return scratch_registry(backbone)


def _short(exc: BaseException) -> None:
    assert 0 < len(str(exc)) <= MESSAGE_LIMIT, f"{len(str(exc))} characters: {str(exc)[:300]}"


def _judge(seen: Counter[str], check: Callable[[], object]) -> None:
    """Run ``check``: a TaskError counts as refused (and must be short), else accepted."""
    try:
        check()
    except TaskError as exc:
        _short(exc)
        seen["refused"] += 1
        return
    seen["accepted"] += 1


def _mutate(obj: Any, path: list[str], value: Any) -> Any:
    """``obj`` with the field at ``path`` replaced by ``value`` (or deleted for ...)."""
    obj = json.loads(json.dumps(obj))
    cur = obj
    for key in path[:-1]:
        cur = cur[key]
    if value is ...:
        cur.pop(path[-1], None)
    else:
        cur[path[-1]] = value
    return obj


FIELDS = [["format_version"], ["name"], ["pet"], ["pet", "type"], ["pet", "r"],
          ["pet", "lora_alpha"], ["pet", "target_modules"], ["head"], ["head", "type"],
          ["head", "num_labels"], ["backbone"], ["backbone", "fingerprint"], ["version"],
          ["created"]]  # fmt: skip


def test_manifests(valid: Any, registry: Any) -> None:
    seen: Counter[str] = Counter()
    good, tensors = valid

    # Random mutations are mostly refused: the same derandomized run of 300 accepted 3 of them
    # in one checkout and 2 in a fresh clone of the same commit, so the valid manifest and two
    # benign edits of it are examples every run tries.
    @settings(max_examples=budget(300))
    @given(
        obj=st.one_of(
            json_values,
            st.builds(_mutate, st.just(good), st.sampled_from(FIELDS), json_values | st.just(...)),
        )
    )
    @example(obj=good)
    @example(obj=_mutate(good, ["version"], 3))
    @example(obj=_mutate(good, ["created"], ...))
    def run(obj: Any) -> None:
        # the PET and head checks on the parsed manifest
        _judge(seen, lambda: registry.validate(TaskManifest.from_json(obj), tensors))

    run()
    print(f"\n{seen}")
    assert seen["refused"] >= 100 and seen["accepted"] >= 3, seen


def test_safetensors_bytes(valid: Any) -> None:
    seen: Counter[str] = Counter()
    blob = save({k: v.contiguous() for k, v in list(valid[1].items())[:3]})
    hlen = int.from_bytes(blob[:8], "little")

    def flip(data: bytes, pos: int, byte: int) -> bytes:
        pos %= len(data)
        return data[:pos] + bytes([byte]) + data[pos + 1 :]

    def forge(header: Any) -> bytes:
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + blob[8 + hlen :]

    header = json.loads(blob[8 : 8 + hlen])
    key = next(k for k in header if k != "__metadata__")
    forged_fields = st.builds(
        lambda field, value: forge({**header, key: {**header[key], field: value}}),
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        json_values,
    )

    @settings(max_examples=budget(300))
    @given(
        data=st.one_of(
            st.binary(max_size=512),
            st.builds(lambda n: blob[:n], st.integers(0, len(blob))),
            st.builds(flip, st.just(blob), st.integers(0, 8 + hlen + 8), st.integers(0, 255)),
            forged_fields,
            st.builds(lambda h: forge(h), json_values),
        )
    )
    def run(data: bytes) -> None:
        def read() -> None:
            tensors = weights_from_bytes(data)
            assert all(isinstance(t, torch.Tensor) for t in tensors.values())

        _judge(seen, read)

    run()
    print(f"\n{seen}")
    assert seen["refused"] >= 100 and seen["accepted"] >= 3, seen


def test_task_folders(valid: Any, registry: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Whole folders as the engine reads them: read_task, then the registry's validation."""
    seen: Counter[str] = Counter()
    good, tensors = valid
    blob = save({k: v.contiguous() for k, v in tensors.items()})
    root = tmp_path_factory.mktemp("fuzz_store")

    @settings(max_examples=budget(120))
    @given(
        manifest=st.one_of(
            st.just(json.dumps(good).encode()),
            st.just(json.dumps(good).encode()),
            st.builds(
                lambda f, v: json.dumps(_mutate(good, f, v)).encode(),
                st.sampled_from(FIELDS),
                json_values | st.just(...),
            ),
            st.binary(max_size=64),
        ),
        weights=st.one_of(
            st.just(blob),
            st.just(blob),
            st.builds(lambda n: blob[:n], st.integers(0, len(blob))),
            st.binary(max_size=64),
        ),
    )
    def run(manifest: bytes, weights: bytes) -> None:
        folder = root / "fz"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / MANIFEST).write_bytes(manifest)
        (folder / WEIGHTS).write_bytes(weights)
        _judge(seen, lambda: registry.validate(*read_task(folder)))

    run()
    print(f"\n{seen}")
    assert seen["refused"] >= 40 and seen["accepted"] >= 3, seen
