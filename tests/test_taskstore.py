"""Task-store validation: bad tasks are refused with a clear reason; the rest loads."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pets.engine import Engine
from pets.errors import RequestError, TaskError
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import (
    MANIFEST,
    WEIGHTS,
    TaskManifest,
    check_name,
    list_tasks,
    read_task,
    write_task,
)


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


# ------------------------------------------------------------------- links and rejections
def _ids_request(name: str) -> dict:
    return {"TASK": np.array([[name.encode()]], dtype=object), "INPUT_IDS": np.array([[101, 102]])}


def test_symlinked_weights_file_is_never_opened(small_store, tmp_path_factory, backbone):
    """A weights file that is a link (here to a file outside the store) is refused by name,
    without reading what it points at; the task is rejected visibly and the rest loads."""
    folder = _write(small_store, backbone, "linked_w")
    outside = tmp_path_factory.mktemp("outside") / "secret.safetensors"
    shutil.move(folder / WEIGHTS, outside)
    (folder / WEIGHTS).symlink_to(outside)
    with pytest.raises(TaskError, match=r"weights\.safetensors is a symbolic link"):
        read_task(folder)
    outside.chmod(0)  # opening through the link now would fail differently: it is not opened
    try:
        eng = Engine.from_parameters({"TASK_STORE": str(small_store), "REFRESH_MS": "0"})
    finally:
        outside.chmod(0o600)
    assert sorted(eng.registry.tasks) == ["ok_bitfit", "ok_lora"]
    assert "symbolic link" in eng.registry.rejected["linked_w"]
    (err,) = eng.execute([_ids_request("linked_w")])
    assert isinstance(err, RequestError) and err.code == "INVALID_ARG"
    assert err.message.startswith("task 'linked_w' exists in the store but failed validation: ")
    assert "<store>/linked_w/weights.safetensors is a symbolic link" in err.message
    assert str(small_store) not in err.message  # no server paths for clients


def test_symlinked_task_folder_is_rejected_visibly(small_store, tmp_path_factory, backbone):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    real = _write(elsewhere, backbone, "via_link")
    (small_store / "via_link").symlink_to(real, target_is_directory=True)
    (small_store / "dangling").symlink_to(elsewhere / "nothing")
    assert "via_link" in list_tasks(small_store) and "dangling" in list_tasks(small_store)
    eng = Engine.from_parameters({"TASK_STORE": str(small_store), "REFRESH_MS": "0"})
    assert sorted(eng.registry.tasks) == ["ok_bitfit", "ok_lora"]
    assert set(eng.registry.rejected) == {"via_link", "dangling"}
    assert "is a symbolic link" in eng.registry.rejected["via_link"]
    (err,) = eng.execute([_ids_request("via_link")])
    assert "exists in the store but failed validation" in err.message
    # `pets list` shows it with its reason too
    out = subprocess.run(
        [sys.executable, "-m", "pets.cli", "list", str(small_store), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["via_link"]["pet"] == "INVALID" and "symbolic link" in rows["via_link"]["head"]
    # removing the link (not its target) clears the rejection at the next refresh
    from pets.taskstore import delete_task

    delete_task(small_store, "via_link")
    assert real.is_dir()
    eng.maybe_refresh(force=True)
    assert "via_link" not in eng.registry.rejected and "dangling" in eng.registry.rejected


def test_rejected_task_is_named_to_clients_and_not_reread(small_store, backbone, monkeypatch):
    eng = Engine.from_parameters({"TASK_STORE": str(small_store), "REFRESH_MS": "0"})

    # written after start without a generation bump: found by the re-check of an unknown name
    def other_backbone(o: dict) -> None:
        o["backbone"]["fingerprint"] = "sha256:0"

    folder = _write(small_store, backbone, "wrong_bb", manifest_edit=other_backbone)
    (err,) = eng.execute([_ids_request("wrong_bb")])
    assert "task 'wrong_bb' exists in the store but failed validation" in err.message
    assert "was made for backbone sha256:0" in err.message
    import pets.registry as registry_mod

    reads = []
    monkeypatch.setattr(registry_mod, "read_task", lambda f: reads.append(f) or read_task(f))
    for _ in range(3):  # naming it again costs no store read while it is unchanged
        (err,) = eng.execute([_ids_request("wrong_bb")])
        assert "failed validation" in err.message
    assert reads == []
    fixed = json.loads((folder / MANIFEST).read_text())
    fixed["backbone"]["fingerprint"] = backbone.spec.fingerprint
    write_task(small_store, TaskManifest.from_json(fixed), read_task_weights(folder))
    (out,) = eng.execute([_ids_request("wrong_bb")])
    assert isinstance(out, np.ndarray) and "wrong_bb" not in eng.registry.rejected


def read_task_weights(folder: Path) -> dict:
    from pets.taskstore import read_weights

    return read_weights(folder / WEIGHTS)


def test_folder_without_manifest_and_file_entries(small_store):
    (small_store / "half_copied").mkdir()
    (small_store / "README.txt").write_text("not a task")
    eng = Engine.from_parameters({"TASK_STORE": str(small_store), "REFRESH_MS": "0"})
    assert "needs manifest.json and weights.safetensors" in eng.registry.rejected["half_copied"]
    assert "README.txt" not in eng.registry.rejected


def test_pets_list_check_shows_what_the_server_refuses(small_store, backbone, capsys):
    from pets.cli import main as cli_main

    def other_backbone(o: dict) -> None:
        o["backbone"]["fingerprint"] = "sha256:0"

    _write(small_store, backbone, "wrong_bb", manifest_edit=other_backbone)
    assert cli_main(["list", str(small_store), "--json"]) == 0
    plain = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert plain["wrong_bb"]["pet"] == "bitfit"  # structurally fine
    assert cli_main(["list", str(small_store), "--json", "--check"]) == 0
    checked = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert checked["wrong_bb"]["pet"] == "INVALID"
    assert "was made for backbone sha256:0" in checked["wrong_bb"]["error"]
    assert checked["ok_lora"]["pet"] == "lora"
