"""Task-store validation: bad tasks are refused with a clear reason; the rest loads."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pets.engine import Engine
from pets.errors import TaskError
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import MANIFEST, WEIGHTS, check_name, read_task, write_task


@pytest.fixture()
def small_store(tmp_path, backbone) -> Path:
    for i, pet in enumerate(["bitfit", "lora"]):
        m, t = random_task(
            backbone, f"ok_{pet}", pet, HeadConfig("classification", num_labels=2), seed=i
        )
        write_task(tmp_path, m, t)
    return tmp_path


def _write(store: Path, backbone, name: str, pet: str = "bitfit", mutate=None, manifest_edit=None):
    m, t = random_task(backbone, name, pet, HeadConfig("classification", num_labels=2), seed=3)
    if mutate:
        mutate(t)
    folder = write_task(store, m, t)
    if manifest_edit:
        obj = json.loads((folder / MANIFEST).read_text())
        manifest_edit(obj)
        (folder / MANIFEST).write_text(json.dumps(obj))
    return folder


def _first(t: dict, suffix: str) -> str:
    return next(k for k in sorted(t) if k.endswith(suffix))


CORRUPTIONS = {
    "unknown_pet_type": (
        dict(manifest_edit=lambda o: o["pet"].update(type="prefix")),
        "unknown PET type 'prefix'",
    ),
    "backbone_mismatch": (
        dict(manifest_edit=lambda o: o["backbone"].update(fingerprint="x")),
        "was made for backbone x",
    ),
    "wrong_shape": (
        dict(mutate=lambda t: t.update({_first(t, "query.bias"): torch.zeros(7)})),
        "has shape (7,), expected (384,)",
    ),
    "nan_values": (
        dict(mutate=lambda t: t[_first(t, "query.bias")].__setitem__(0, float("nan"))),
        "contains NaN or Inf",
    ),
    "unknown_tensor": (
        dict(mutate=lambda t: t.update({"encoder.layer.0.evil": torch.zeros(1)})),
        "unexpected tensor name",
    ),
    "lora_rank_mismatch": (
        dict(pet="lora", manifest_edit=lambda o: o["pet"].update(r=3)),
        "expected (3, 384)",
    ),
    "missing_head": (
        dict(mutate=lambda t: t.pop("classifier.weight")),
        "needs tensor 'classifier.weight'",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_task_is_skipped_and_the_rest_loads(small_store, backbone, case):
    kwargs, message = CORRUPTIONS[case]
    _write(small_store, backbone, "bad", **kwargs)
    eng = Engine.from_parameters({"TASK_STORE": str(small_store)})
    assert sorted(eng.registry.tasks) == ["ok_bitfit", "ok_lora"]
    assert len(eng.load_errors) == 1 and "'bad'" in eng.load_errors[0]
    assert message in eng.load_errors[0], eng.load_errors[0]


def test_truncated_pickle_and_oversized_files_are_refused(tmp_path, backbone):
    folder = _write(tmp_path, backbone, "t")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskError, match="truncated"):
        read_task(folder)
    (folder / WEIGHTS).write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    with pytest.raises(TaskError, match=r"not a safetensors file|corrupt"):
        read_task(folder)
    # A header that declares far more data than the file holds.
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}})
    blob = len(header).to_bytes(8, "little") + header.encode()
    (folder / WEIGHTS).write_bytes(blob)
    with pytest.raises(TaskError, match="truncated or padded"):
        read_task(folder)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 200, "a..b", None])
def test_bad_names_are_refused(name):
    with pytest.raises(TaskError, match="invalid task name"):
        check_name(name)


def test_manifest_name_must_match_folder(tmp_path, backbone):
    folder = _write(tmp_path, backbone, "good")
    shutil.move(folder, tmp_path / "renamed")
    with pytest.raises(TaskError, match="differs from its folder"):
        read_task(tmp_path / "renamed")


def test_write_is_atomic_and_replaces(tmp_path, backbone):
    _write(tmp_path, backbone, "t")
    _write(
        tmp_path,
        backbone,
        "t",
        mutate=lambda t: t.update(
            {_first(t, "query.bias"): torch.ones_like(t[_first(t, "query.bias")])}
        ),
    )
    _, t = read_task(tmp_path / "t")
    assert torch.all(t[_first(t, "query.bias")] == 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".old"))]
