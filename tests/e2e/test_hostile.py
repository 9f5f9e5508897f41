"""The malformed-request table over HTTP and gRPC against the real server (issue 17).

Every case is sent beside a valid request (concurrently, so the batcher may put both in one
execute); the bad one gets its own error (status and message below), the valid batch-mate
is answered exactly as the in-process engine answers it alone. Uses the session server of
tests/e2e/conftest.py (no extra start); the rejected store entries it adds are removed at
the end. ``pytest -s`` prints the table (case -> HTTP / gRPC answer).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from clients.pets_client import MODEL, client_module
from pets.heads import HeadConfig
from pets.taskgen import random_task
from pets.taskstore import WEIGHTS, delete_task, write_task

from .conftest import Server

pytestmark = pytest.mark.triton
PROTOCOLS = ("http", "grpc")
GOOD_TASK, GOOD_IDS = "demo_lora", np.array([[101, 7592, 2088, 102]], dtype=np.int64)
REJECTED = ("hostile_linked_weights", "hostile_linked_folder")
EMBEDDING = "hostile_embedding"  # a task with another output width than GOOD_TASK
MESSAGE_LIMIT = 1024  # no error is longer: client input is quoted only in part

T = "TASK"


def b(*names: str) -> np.ndarray:
    return np.array([n.encode() for n in names], dtype=object).reshape(-1, 1)


def ids(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# case -> (inputs {name: array}, (HTTP status, gRPC status), message fragment)
BAD = "400", "StatusCode.INVALID_ARGUMENT"
CASES: dict[str, tuple[dict[str, np.ndarray], tuple[str, str], str]] = {
    "unknown task": ({T: b("no_such_task"), "INPUT_IDS": ids([101, 102])}, BAD,
                     "unknown task 'no_such_task'"),
    "task name 200 chars": ({T: b("t" * 200), "INPUT_IDS": ids([101, 102])}, BAD,
                            "a TASK row has 200 bytes; the limit is 128"),
    "task name 1 MiB": ({T: b("n" * (1 << 20)), "INPUT_IDS": ids([101, 102])}, BAD,
                        "a TASK row has 1048576 bytes; the limit is 128"),
    "TASK not UTF-8": ({T: np.array([[b"\xff\xfe"]], dtype=object),
                        "INPUT_IDS": ids([101])}, BAD, "TASK is not valid UTF-8"),
    "TEXT 70000 bytes": ({T: b(GOOD_TASK), "TEXT": b("w" * 70_000)}, BAD,
                         "a TEXT row has 70000 bytes; the limit is 65536 (MAX_TEXT_BYTES)"),
    "TEXT 16 MiB": ({T: b(GOOD_TASK), "TEXT": b("w" * (16 << 20))}, BAD,
                    "a TEXT row has 16777216 bytes; the limit is 65536"),
    "TEXT 20 x 60000 bytes": ({T: b(*[GOOD_TASK] * 20), "TEXT": b(*["w" * 60_000] * 20)},
                              BAD, "have 1200000 bytes together; the limit is 1048576 per "
                              "request (MAX_REQUEST_TEXT_BYTES)"),
    "TEXT empty": ({T: b(GOOD_TASK), "TEXT": b("")}, BAD, "TEXT is empty"),
    "INPUT_IDS 513 wide": ({T: b(GOOD_TASK), "INPUT_IDS": np.ones((1, 513), np.int64)}, BAD,
                           "INPUT_IDS has 513 tokens; the limit is 512 (MAX_SEQ_LEN)"),
    "INPUT_IDS out of vocab": ({T: b(GOOD_TASK), "INPUT_IDS": ids([101, 999_999])}, BAD,
                               "outside the vocabulary [0, 30522)"),
    "INPUT_IDS negative": ({T: b(GOOD_TASK), "INPUT_IDS": ids([101, -5])}, BAD,
                           "holds token id -5"),
    "INPUT_IDS [1, 0]": ({T: b(GOOD_TASK), "INPUT_IDS": np.zeros((1, 0), np.int64)}, BAD,
                         "INPUT_IDS is empty"),
    "neither TEXT nor ids": ({T: b(GOOD_TASK)}, BAD, "got neither"),
    "TEXT and ids": ({T: b(GOOD_TASK), "TEXT": b("x"), "INPUT_IDS": ids([101])}, BAD,
                     "got both"),
    "INPUT_IDS and INT32": ({T: b(GOOD_TASK), "INPUT_IDS": ids([101]),
                             "INPUT_IDS_INT32": ids([101]).astype(np.int32)}, BAD,
                            "both INPUT_IDS (INT64) and INPUT_IDS_INT32"),
    "rows of different widths": ({T: b(GOOD_TASK, EMBEDDING),
                                  "INPUT_IDS": ids([101, 102], [101, 102])}, BAD,
                                 "outputs of different widths"),
    "rejected: linked weights": ({T: b(REJECTED[0]), "INPUT_IDS": ids([101, 102])}, BAD,
                                 "exists in the store but failed validation: <store>/"
                                 "hostile_linked_weights/weights.safetensors is a symbolic link"),
    "rejected: linked folder": ({T: b(REJECTED[1]), "INPUT_IDS": ids([101, 102])}, BAD,
                                "exists in the store but failed validation: task folder"),
    # refused by Triton's core before the model sees them (documented in README/docs):
    "TASK [1,1], ids [2,L]": ({T: b(GOOD_TASK), "INPUT_IDS": ids([101, 102], [101, 103])},
                              BAD, "batch size does not match other inputs"),
    "rank-1 INPUT_IDS [L]": ({T: b(GOOD_TASK), "INPUT_IDS": np.array([101, 102], np.int64)},
                             BAD, "batch size does not match other inputs"),
    "INPUT_IDS as FP32": ({T: b(GOOD_TASK), "INPUT_IDS": np.ones((1, 2), np.float32)}, BAD,
                          "INT64"),
    "no TASK": ({"INPUT_IDS": ids([101, 102])}, BAD, "TASK"),
    "257 rows (max_batch_size 256)": ({T: b(*[GOOD_TASK] * 257),
                                       "INPUT_IDS": np.full((257, 2), 101, np.int64)}, BAD,
                                      "batch-size must be <= 256"),
}  # fmt: skip

_DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}


def infer(server: Server, protocol: str, inputs: dict[str, np.ndarray]) -> Any:
    """One request with exactly these tensors; the OUTPUT array or the exception."""
    mod = client_module(protocol)
    url = server.http_url if protocol == "http" else server.grpc_url
    client = mod.InferenceServerClient(url)
    tensors = []
    for name, arr in inputs.items():
        dtype = "BYTES" if arr.dtype == object else _DTYPES[arr.dtype]
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    try:
        return client.infer(MODEL, tensors).as_numpy("OUTPUT")
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


@pytest.fixture(scope="module")
def hostile_server(
    triton_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The session server with two rejected entries in its store (removed afterwards)."""
    store = triton_server.store
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(store / GOOD_TASK, outside / REJECTED[1])
    linked = store / REJECTED[0]
    shutil.copytree(store / GOOD_TASK, linked)
    (linked / "manifest.json").write_text(
        (linked / "manifest.json").read_text().replace(GOOD_TASK, REJECTED[0])
    )
    shutil.move(linked / WEIGHTS, outside / WEIGHTS)
    (linked / WEIGHTS).symlink_to(outside / WEIGHTS)
    (outside / REJECTED[1] / "manifest.json").write_text(
        (outside / REJECTED[1] / "manifest.json").read_text().replace(GOOD_TASK, REJECTED[1])
    )
    (store / REJECTED[1]).symlink_to(outside / REJECTED[1], target_is_directory=True)
    from pets.backbone import load_backbone, resolve_checkpoint

    weights = load_backbone(resolve_checkpoint(triton_server.params()["BACKBONE"]))
    write_task(store, *random_task(weights, EMBEDDING, "bitfit", HeadConfig("embedding"), seed=7))
    try:
        yield triton_server
    finally:
        (store / REJECTED[1]).unlink()
        shutil.rmtree(linked)
        delete_task(store, EMBEDDING)


@pytest.fixture(scope="module")
def good_alone(hostile_server: Server) -> np.ndarray:
    out = infer(hostile_server, "http", {T: b(GOOD_TASK), "INPUT_IDS": GOOD_IDS})
    assert isinstance(out, np.ndarray), out
    return out


TABLE: dict[str, dict[str, str]] = {}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request_fails_alone(
    hostile_server: Server, good_alone: np.ndarray, case: str, protocol: str
) -> None:
    inputs, statuses, fragment = CASES[case]
    good = {T: b(GOOD_TASK), "INPUT_IDS": GOOD_IDS}
    with ThreadPoolExecutor(2) as pool:  # sent together: the batcher may merge them
        bad_f = pool.submit(infer, hostile_server, protocol, inputs)
        good_f = pool.submit(infer, hostile_server, protocol, good)
        bad, mate = bad_f.result(), good_f.result()
    assert isinstance(bad, InferenceServerException), f"{case}: expected an error, got {bad!r}"
    msg = str(bad.message())
    TABLE.setdefault(case, {})[protocol] = f"{bad.status()}: {msg[:160]}"
    assert bad.status() == statuses[PROTOCOLS.index(protocol)], f"{case}: {bad.status()} {msg}"
    assert fragment in msg, f"{case}: {msg[:500]}"
    assert len(msg) <= MESSAGE_LIMIT, f"{case}: a {len(msg)}-character message"
    assert isinstance(mate, np.ndarray), f"{case}: the valid batch-mate failed: {mate}"
    np.testing.assert_allclose(mate, good_alone, rtol=1e-4, atol=1e-5)


def test_pets_status_shows_rejected_tasks_and_backbone(hostile_server: Server) -> None:
    """Without the admin token: `pets status` (the metrics port) names the rejected store
    entries with their reasons, and the served backbone's fingerprint."""
    import time

    from pets.metrics import scrape, status_table

    deadline, out = time.monotonic() + 15, ""
    while time.monotonic() < deadline:  # pushed every METRICS_INTERVAL_MS (1 s)
        out = status_table(scrape(hostile_server.metrics_url))
        if all(f"REJECTED {name} " in out for name in REJECTED):
            break
        time.sleep(0.5)
    print("\n" + out)
    assert "REJECTED hostile_linked_weights (instances pets_0_0): <store>/" in out, out
    assert "weights.safetensors is a symbolic link" in out
    assert "REJECTED hostile_linked_folder (instances pets_0_0): task folder <store>/" in out
    assert "backbone sha256:" in out


def test_print_table(hostile_server: Server) -> None:
    """Prints the table collected above (pytest -s); runs after the cases."""
    if not TABLE:
        pytest.skip("no case ran")
    width = max(len(c) for c in TABLE)
    print("\n" + "\n".join(
        f"{case:<{width}} | HTTP {r.get('http', '-')}\n{'':<{width}} | gRPC {r.get('grpc', '-')}"
        for case, r in TABLE.items()
    ))  # fmt: skip
