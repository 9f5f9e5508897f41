"""Bad requests get their own INVALID_ARG error naming the problem; batch-mates succeed."""

from __future__ import annotations

import numpy as np
import pytest

from pets.errors import RequestError
from pets.protocol import check_stub_numpy


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


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"TASK": np.array([[b"t"]] * 5, dtype=object), "INPUT_IDS": np.ones((5, 2), np.int64)},
            "TASK has 5 rows; the limit is 4 per request (MAX_ROWS)",
        ),
        (
            {"TASK": task("t"), "INPUT_IDS": np.ones((5, 2), np.int64)},
            "INPUT_IDS has 5 rows; the limit is 4 per request (MAX_ROWS)",
        ),
        (
            {"TASK": task("t"), "TEXT": np.array([[b"x" * 90]] * 3, dtype=object)},
            "the TEXT rows of this request have 270 bytes together; the limit is 200 per "
            "request (MAX_REQUEST_TEXT_BYTES)",
        ),
        (
            {"TASK": task("t"), "INPUT_IDS": np.ones((1, 9), np.int64)},
            "INPUT_IDS has 9 tokens; the limit is 8 (MAX_SEQ_LEN)",
        ),
    ],
    ids=["task_rows", "ids_rows", "request_text", "ids_width"],
)
def test_request_limits_refuse_before_any_work(engine, request_, message, monkeypatch):
    """Each limit refuses with its parameter's name, before tokenizing or copying."""
    from pets.protocol import Limits, decode_request

    calls = []
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "encode_batch", lambda texts: calls.append(texts))  # never reached
    with pytest.raises(RequestError) as info:
        decode_request(request_, tok, Limits(8, 30522, 100, max_rows=4, max_request_text_bytes=200))
    assert message in info.value.message and calls == []


def test_limits_are_config_parameters():
    from pets.engine import EngineConfig
    from pets.errors import ConfigError

    cfg = EngineConfig.from_parameters({"MAX_ROWS": "16", "MAX_REQUEST_TEXT_BYTES": "4096"})
    assert (cfg.max_rows, cfg.max_request_text_bytes) == (16, 4096)
    defaults = EngineConfig()
    assert (defaults.max_rows, defaults.max_text_bytes, defaults.max_request_text_bytes) == (
        256,
        1 << 16,
        1 << 20,
    )
    with pytest.raises(ConfigError, match="MAX_ROWS=0"):
        EngineConfig.from_parameters({"MAX_ROWS": "0"})


@pytest.mark.parametrize("version", ["2.0.0", "2.1.3", "10.0"])
def test_numpy_2_is_refused_for_the_stub(version):
    with pytest.raises(RuntimeError, match=rf"numpy {version} .*Install numpy<2"):
        check_stub_numpy(version)
    check_stub_numpy("1.26.4")
