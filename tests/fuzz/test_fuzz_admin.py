"""Fuzz the pets_admin request handler (pets.admin.Admin.handle: the token check, the action,
name, manifest and weights parsing, validation and publishing).

Property: every request is answered with a result or an AdminError with a short message;
nothing else escapes; a refused request leaves the store byte-for-byte unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pets.admin import ACTIONS, Admin, AdminError, safetensors_bytes
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.validate import scratch_registry

from .conftest import budget

TOKEN = "fuzz-token-0123456789abcdef"
MESSAGE_LIMIT = 600


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file of the store but the lock (its content is not the store's state)."""
    if not store.exists():
        return {}
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name not in (".admin.lock", ".generation")
    }


@pytest.fixture(scope="module")
def admin(backbone: Any, tmp_path_factory: pytest.TempPathFactory) -> Admin:
    return Admin(tmp_path_factory.mktemp("admin_fuzz") / "store", scratch_registry(backbone), TOKEN)


@pytest.fixture(scope="module")
def payloads(backbone: Any) -> dict[str, tuple[dict[str, Any], bytes]]:
    out = {}
    for pet in ("bitfit", "lora", "adapter"):
        m, t = random_task(backbone, "x", pet, HeadConfig("classification", num_labels=2), seed=1)
        obj = m.to_json()
        del obj["name"]
        out[pet] = (obj, safetensors_bytes(t))
    return out


blobs = st.one_of(st.none(), st.binary(max_size=64), st.binary(min_size=5000, max_size=6000))
names = st.one_of(
    st.sampled_from([b"t1", b"t2", b"../etc", b"", b"a" * 129, b"\xff"]),
    st.binary(max_size=40),
    st.text(min_size=2000, max_size=2100).map(str.encode),
)


@st.composite
def admin_requests(draw: st.DrawFn, payloads: dict) -> tuple:
    if draw(st.sampled_from([True, False, False])):  # a well-formed request (lifecycle)
        obj, weights = payloads[draw(st.sampled_from(sorted(payloads)))]
        action = draw(st.sampled_from([b"register", b"update", b"unregister", b"status"]))
        name = draw(st.sampled_from([b"t1", b"t2"]))
        return TOKEN.encode(), action, name, json.dumps(obj).encode(), weights
    token = draw(st.sampled_from([TOKEN.encode()] * 6 + [None, b"", b"wrong-token-0123456789"]))
    action = draw(
        st.one_of(
            st.sampled_from([a.encode() for a in ACTIONS]),
            st.sampled_from(list(ACTIONS)),
            st.binary(max_size=3000),
        )
    )
    name = draw(st.one_of(names, st.none()))
    obj, weights = payloads[draw(st.sampled_from(sorted(payloads)))]
    field = draw(st.sampled_from(["keep", "keep", "pet", "head", "backbone", "format_version"]))
    if field != "keep":
        obj = {**obj, field: draw(st.one_of(st.integers(), st.text(max_size=3000), st.none()))}
    manifest = draw(st.one_of(st.just(json.dumps(obj).encode()), blobs))
    cut = draw(st.sampled_from([None, None, 0, 8, 100, len(weights) - 1]))
    weights = draw(st.one_of(st.just(weights if cut is None else weights[:cut]), blobs))
    return token, action, name, manifest, weights


def test_admin_requests(admin: Admin, payloads: dict) -> None:
    seen: Counter[str] = Counter()

    # The lifecycle's successes depend on the order the drawn requests come in (6 of 200 in
    # one run, against a bound of 3): a register, an update and a second register of valid
    # payloads are examples every run starts with, on the module's fresh store.
    obj, weights = payloads[sorted(payloads)[0]]
    well_formed = (TOKEN.encode(), json.dumps(obj).encode(), weights)

    def lifecycle(action: bytes, name: bytes) -> tuple:
        token, manifest, blob = well_formed
        return token, action, name, manifest, blob

    @settings(max_examples=budget(200))
    @given(req=admin_requests(payloads))
    @example(req=lifecycle(b"register", b"t1"))
    @example(req=lifecycle(b"update", b"t1"))
    @example(req=lifecycle(b"register", b"t2"))
    def run(req: tuple) -> None:
        before = snapshot(admin.store)
        try:
            result = admin.handle(*req)
        except AdminError as err:
            assert 0 < len(err.message) <= MESSAGE_LIMIT, err.message[:300]
            assert TOKEN not in err.message
            assert snapshot(admin.store) == before, "a refused request changed the store"
            seen[f"refused {err.code}"] += 1
            return
        assert result["ok"] is True and TOKEN not in json.dumps(result)
        seen[f"ok {result.get('action', 'query')}"] += 1

    run()
    print(f"\n{seen}")
    assert seen["refused INVALID_ARG"] >= 50, seen
    assert seen["ok register"] + seen["ok update"] >= 3 and sum(seen.values()) >= 150, seen
