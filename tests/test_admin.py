"""pets.admin without a server: tokens, actions, and refusals that leave the store unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lifecycle_tasks import make_versions, named

from pets.admin import Admin, AdminError, load_token, safetensors_bytes
from pets.errors import ConfigError
from pets.taskstore import read_task

TOKEN = "unit-test-token-0123456789"


@pytest.fixture(scope="module")
def versions(backbone: Any) -> list[Any]:
    return make_versions(backbone)


@pytest.fixture()
def admin(tmp_path: Path, backbone: Any) -> Admin:
    from pets.validate import scratch_registry

    return Admin(tmp_path / "store", scratch_registry(backbone), TOKEN)


def payload(task: Any) -> tuple[bytes, bytes]:
    m, t = task
    return json.dumps(m.to_json()).encode(), safetensors_bytes(t)


def test_token_sources(tmp_path: Path) -> None:
    assert load_token({}, tmp_path, {}) is None  # admin disabled
    assert load_token({}, tmp_path, {"PETS_ADMIN_TOKEN": f" {TOKEN}\n"}) == TOKEN
    (tmp_path / "tok").write_text(TOKEN + "\n")
    assert (
        load_token({"ADMIN_TOKEN_FILE": "tok"}, tmp_path, {"PETS_ADMIN_TOKEN": "x" * 20}) == TOKEN
    )  # the file wins
    with pytest.raises(ConfigError, match="at least 16"):
        load_token({}, tmp_path, {"PETS_ADMIN_TOKEN": "short"})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_token({"ADMIN_TOKEN_FILE": "missing"}, tmp_path, {})


def test_disabled_admin_refuses_everything(tmp_path: Path, backbone: Any) -> None:
    from pets.validate import scratch_registry

    off = Admin(tmp_path, scratch_registry(backbone), None)
    with pytest.raises(AdminError, match="disabled") as info:
        off.handle(b"", b"list")
    assert info.value.code == "UNAVAILABLE"


def test_register_update_unregister_list_status(admin: Admin, versions: list[Any]) -> None:
    tok = TOKEN.encode()
    m, w = payload(named(versions[0], "t1"))
    res = admin.handle(tok, b"register", b"t1", m, w)
    assert res["ok"] and res["pet"] == "bitfit"
    assert read_task(admin.store / "t1")[0].pet_type == "bitfit"
    m2, w2 = payload(named(versions[1], "t1"))
    assert admin.handle(tok, b"update", b"t1", m2, w2)["pet"] == "lora"
    assert read_task(admin.store / "t1")[0].pet_type == "lora"
    listed = admin.handle(tok, b"list")
    assert [t["name"] for t in listed["tasks"]] == ["t1"] and listed["backbone"]
    assert admin.handle(tok, b"status", b"t1")["manifest"]["pet"]["type"] == "lora"
    assert admin.handle(tok, b"status")["tasks"] == 1
    assert admin.handle(tok, b"unregister", b"t1")["ok"]
    assert not (admin.store / "t1").exists()
    assert admin.registry.tasks == {}  # trial loads give their scratch slots back


def _snapshot(store: Path) -> set[tuple[str, int]]:
    return {
        (str(p.relative_to(store)), p.stat().st_mtime_ns)
        for p in store.rglob("*")
        if p.is_file() and p.name != ".admin.lock"
    }


def test_hostile_input_is_refused_and_store_unchanged(admin: Admin, versions: list[Any]) -> None:
    tok = TOKEN.encode()
    admin.handle(tok, b"register", b"keep", *payload(named(versions[0], "keep")))
    before = _snapshot(admin.store)
    m, t = named(versions[1], "evil")
    good_m, good_w = payload((m, t))
    bad_shape = {**t, next(iter(sorted(t))): torch.zeros(2, 2)}
    nan = {k: v.clone() for k, v in t.items()}
    next(iter(nan.values())).view(-1)[0] = float("inf")
    cases: dict[str, tuple[tuple[Any, ...], str, str]] = {
        "wrong token": (
            (b"x" * 26, b"register", b"evil", good_m, good_w),
            "wrong or missing",
            "INVALID_ARG",
        ),
        "no token": (
            (None, b"register", b"evil", good_m, good_w),
            "wrong or missing",
            "INVALID_ARG",
        ),
        "dotdot": (
            (tok, b"register", b"../evil", good_m, good_w),
            "invalid task name",
            "INVALID_ARG",
        ),
        "slash": ((tok, b"register", b"a/b", good_m, good_w), "invalid task name", "INVALID_ARG"),
        "truncated": ((tok, b"register", b"evil", good_m, good_w[:-1]), "truncated", "INVALID_ARG"),
        "tiny": ((tok, b"register", b"evil", good_m, b"\x01"), "truncated", "INVALID_ARG"),
        "huge header": (
            (tok, b"register", b"evil", good_m, (10**12).to_bytes(8, "little") + good_w[8:]),
            "declares a",
            "INVALID_ARG",
        ),
        "pickle": (
            (tok, b"register", b"evil", good_m, torch_save_bytes(t)),
            "not a safetensors",
            "INVALID_ARG",
        ),
        "shape": (
            (tok, b"register", b"evil", good_m, safetensors_bytes(bad_shape)),
            "shape",
            "INVALID_ARG",
        ),
        "inf": (
            (tok, b"register", b"evil", good_m, safetensors_bytes(nan)),
            "NaN or Inf",
            "INVALID_ARG",
        ),
        "manifest list": (
            (tok, b"register", b"evil", b"[1, 2]", good_w),
            "JSON object",
            "INVALID_ARG",
        ),
        "exists": (
            (tok, b"register", b"keep", payload(named(versions[1], "keep"))[0], good_w),
            "already exists",
            "ALREADY_EXISTS",
        ),
        "update missing": (
            (tok, b"update", b"evil", good_m, good_w),
            "does not exist",
            "NOT_FOUND",
        ),
        "unregister missing": ((tok, b"unregister", b"evil"), "does not exist", "NOT_FOUND"),
        "not utf8": ((tok, b"\xff\xfe", b"evil"), "UTF-8", "INVALID_ARG"),
    }
    for case, (args, words, code) in cases.items():
        with pytest.raises(AdminError) as info:
            admin.handle(*args)
        assert words in info.value.message and info.value.code == code, (case, info.value)
        assert TOKEN not in info.value.message
    assert _snapshot(admin.store) == before
    assert admin.registry.tasks == {}


def torch_save_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()
