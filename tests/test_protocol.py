"""Bad requests get their own INVALID_ARG error naming the problem; batch-mates succeed."""

from __future__ import annotations

import numpy as np
import pytest

from pets.errors import RequestError


def task(name: str) -> np.ndarray:
    return np.array([[name.encode()]], dtype=object)


GOOD = {"TASK": task("demo_bitfit"), "INPUT_IDS": np.array([[101, 2023, 2003, 102]])}

BAD_CASES = [
    (
        {"TASK": task("no_such_task"), "INPUT_IDS": np.array([[101, 102]])},
        "unknown task 'no_such_task'",
    ),
    (
        {"TASK": task("demo_bitfit"), "INPUT_IDS": np.zeros((1, 0), dtype=np.int64)},
        "INPUT_IDS is empty",
    ),
    (
        {"TASK": task("demo_bitfit"), "INPUT_IDS": np.ones((1, 513), dtype=np.int64)},
        "INPUT_IDS has 513 tokens; the limit is 512",
    ),
    (
        {"TASK": task("demo_bitfit"), "INPUT_IDS": np.ones((1, 4), dtype=np.float32)},
        "INPUT_IDS has dtype float32",
    ),
    (
        {"TASK": task("demo_bitfit"), "INPUT_IDS": np.ones((1, 2, 3), dtype=np.int64)},
        "INPUT_IDS must have shape [k, L]",
    ),
    (
        {"TASK": task("demo_bitfit"), "INPUT_IDS": np.array([[101, 999999]])},
        "outside the vocabulary [0, 30522)",
    ),
    ({"TASK": task("demo_bitfit"), "TEXT": np.array([[b""]], dtype=object)}, "TEXT is empty"),
    ({"TASK": task("demo_bitfit")}, "send exactly one of TEXT or INPUT_IDS, got neither"),
    (
        {
            "TASK": task("demo_bitfit"),
            "TEXT": np.array([[b"x"]], dtype=object),
            "INPUT_IDS": np.array([[101]]),
        },
        "got both",
    ),
    ({"INPUT_IDS": np.array([[101]])}, "request has no TASK input"),
    (
        {"TASK": np.array([[1]], dtype=np.int64), "INPUT_IDS": np.array([[101]])},
        "TASK must be a BYTES (string) tensor",
    ),
    (
        {
            "TASK": np.array([[b"demo_bitfit"], [b"demo_lora"]], dtype=object),
            "INPUT_IDS": np.array([[101, 102], [101, 102], [101, 102]]),
        },
        "TASK has 2 rows but the input has 3",
    ),
    (
        {
            "TASK": np.array([[b"demo_bitfit"], [b"emb_bitfit_cls"]], dtype=object),
            "INPUT_IDS": np.array([[101, 102], [101, 102]]),
        },
        "outputs of different widths",
    ),
    (
        {"TASK": np.array([[b"\xff\xfe"]], dtype=object), "INPUT_IDS": np.array([[101]])},
        "not valid UTF-8",
    ),
    (
        {"TASK": task("t" * 129), "INPUT_IDS": np.array([[101]])},
        "a TASK row has 129 bytes; the limit is 128 (task names have at most 128 characters)",
    ),
    (
        {"TASK": task("demo_bitfit"), "TEXT": np.array([[b"w" * 70_000]], dtype=object)},
        "a TEXT row has 70000 bytes; the limit is 65536 (MAX_TEXT_BYTES)",
    ),
]


@pytest.mark.parametrize(
    ("request_", "message"), BAD_CASES, ids=[m.split(";")[0][:40] for _, m in BAD_CASES]
)
def test_bad_request_gets_its_own_error(engine, request_, message):
    good_alone = engine.execute([GOOD])[0]
    outs = engine.execute([GOOD, request_, GOOD])
    err = outs[1]
    assert isinstance(err, RequestError), f"expected an error, got {err!r}"
    assert err.code == "INVALID_ARG"
    assert message in err.message, err.message
    for ok in (outs[0], outs[2]):  # batch-mates unaffected and unchanged
        assert isinstance(ok, np.ndarray)
        np.testing.assert_allclose(ok, good_alone, atol=1e-6)


def test_multi_row_request_returns_one_row_per_sequence(engine):
    out = engine.execute(
        [
            {
                "TASK": np.array([[b"demo_lora"], [b"demo_adapter"]], dtype=object),
                "INPUT_IDS": np.array([[101, 2000, 102], [101, 3000, 102]]),
            }
        ]
    )[0]
    assert out.shape == (2, 3)
    alone = engine.execute(
        [{"TASK": task("demo_adapter"), "INPUT_IDS": np.array([[101, 3000, 102]])}]
    )
    np.testing.assert_allclose(out[1], alone[0][0], atol=1e-5)


def test_text_is_truncated_to_max_seq_len(engine):
    long_text = np.array([[("word " * 2000).encode()]], dtype=object)
    out = engine.execute([{"TASK": task("demo_bitfit"), "TEXT": long_text}])[0]
    assert isinstance(out, np.ndarray) and out.shape == (1, 3)


def test_an_unknown_long_name_is_quoted_only_in_part(engine):
    name = "x" * 120
    (err,) = engine.execute([{"TASK": task(name), "INPUT_IDS": np.array([[101, 102]])}])
    assert isinstance(err, RequestError) and "(120 characters)" in err.message
    assert name not in err.message and len(err.message) < 300
