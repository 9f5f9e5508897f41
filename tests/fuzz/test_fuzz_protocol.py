"""Fuzz the request decoder (pets.protocol.decode_request) with Hypothesis.

Whatever arrives (any dtype, shape, byte content, unicode, sizes around every limit), the
decoder either returns rows that satisfy the engine's contract or raises RequestError with
a short message; nothing else escapes, and nothing unbounded is echoed back. The batched
decoder (``decode_requests``, what the engine runs) gives every request of a batch exactly
what the one-request decoder gives it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pets.backbone import default_checkpoint
from pets.errors import RequestError
from pets.protocol import Limits, Row, decode_request, decode_requests
from pets.taskstore import MAX_NAME_LEN
from pets.tokenizer import load_tokenizer

from .conftest import budget

MAX_LEN, VOCAB, MAX_TEXT, MAX_ROWS = 16, 30522, 256, 8  # VOCAB: the default backbone's
LIMITS = Limits(MAX_LEN, VOCAB, MAX_TEXT, MAX_ROWS)
MESSAGE_LIMIT = 400  # no error message may be longer (gRPC caps error metadata at 8 KiB)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = load_tokenizer(default_checkpoint(), MAX_LEN)
    assert tok is not None, "the default backbone ships a tokenizer.json"
    return tok


names = st.one_of(
    st.sampled_from(["demo_lora", "a", "x" * MAX_NAME_LEN, "x" * (MAX_NAME_LEN + 1), ""]),
    st.text(max_size=40),
    st.text(max_size=300),
)
texts = st.text(min_size=1, max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass"))
byte_rows = st.one_of(
    texts,
    texts,
    st.binary(max_size=MAX_TEXT + 64),
    st.binary(min_size=MAX_TEXT - 2, max_size=MAX_TEXT + 2),
    names.map(lambda s: s.encode("utf-8", "surrogatepass")),
)


def bytes_tensor(rows: st.SearchStrategy[bytes]) -> st.SearchStrategy[np.ndarray]:
    """Object arrays of bytes in the usual [k, 1] and in odd shapes."""
    shapes = st.one_of(
        st.tuples(st.integers(0, MAX_ROWS + 2), st.just(1)),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=MAX_ROWS + 2),
    )

    def build(shape: tuple[int, ...], data: st.DataObject) -> np.ndarray:
        n = int(np.prod(shape)) if shape else 1
        flat = np.empty(n, dtype=object)
        for i, v in enumerate(data.draw(st.lists(rows, min_size=n, max_size=n))):
            flat[i] = v
        return flat.reshape(shape)

    return st.builds(build, shapes, st.data())


id_arrays = st.one_of(
    hnp.arrays(
        dtype=st.sampled_from([np.int64, np.int32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=MAX_LEN + 3),
        elements=st.integers(-3, VOCAB + 3),
    ),
    hnp.arrays(
        dtype=hnp.scalar_dtypes(),
        shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
    ),
)
wrong_tensors = st.one_of(id_arrays, bytes_tensor(byte_rows))


likely = st.sampled_from([True, True, True, False])  # mostly well-formed, then broken


@st.composite
def requests(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Requests near the contract: each input is well-formed with probability 3/4 (rows and
    lengths around every limit), else an arbitrary tensor of any dtype and shape."""
    k = draw(st.integers(1, MAX_ROWS + 1))
    req: dict[str, np.ndarray] = {}
    if draw(likely):
        task_rows = draw(st.sampled_from([k, k, 1, k + 1]))
        tnames = draw(st.lists(names, min_size=task_rows, max_size=task_rows))
        req["TASK"] = np.array([[n.encode("utf-8", "surrogatepass")] for n in tnames], object)
    elif draw(st.booleans()):
        req["TASK"] = draw(wrong_tensors)
    kind = draw(st.sampled_from(["TEXT", "INPUT_IDS", "INPUT_IDS_INT32", "both", "none"]))
    if kind in ("TEXT", "both"):
        if draw(likely):
            texts = draw(st.lists(byte_rows, min_size=k, max_size=k))
            req["TEXT"] = np.array([[t] for t in texts], dtype=object)
        else:
            req["TEXT"] = draw(wrong_tensors)
    if kind in ("INPUT_IDS", "INPUT_IDS_INT32", "both"):
        name = "INPUT_IDS" if kind != "INPUT_IDS_INT32" else kind
        if draw(likely):
            length = draw(st.integers(0, MAX_LEN + 1))
            dtype = np.int32 if name == "INPUT_IDS_INT32" else np.int64
            req[name] = draw(hnp.arrays(dtype, (k, length), elements=st.integers(-1, VOCAB)))
        else:
            req[name] = draw(wrong_tensors)
    return req


def check_rows(rows: list[Any]) -> None:
    assert 1 <= len(rows) <= MAX_ROWS
    for r in rows:
        assert isinstance(r.task, str) and len(r.task.encode()) <= MAX_NAME_LEN
        assert r.ids.dtype == np.int64 and r.ids.ndim == 1
        assert 1 <= len(r.ids) <= MAX_LEN
        assert r.ids.min() >= 0 and r.ids.max() < VOCAB


def test_decoder_returns_valid_rows_or_a_short_request_error(tokenizer: Any) -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=budget(400))
    @given(req=requests())
    def run(req: dict) -> None:
        try:
            rows = decode_request(req, tokenizer, LIMITS)
        except RequestError as err:
            assert err.code == "INVALID_ARG"
            assert 0 < len(err.message) <= MESSAGE_LIMIT, err.message
            seen["refused"] += 1
            return
        check_rows(rows)
        seen["text" if "TEXT" in req else "ids"] += 1

    run()
    print(f"\n{seen}")
    # not vacuous: the strategies reach both outcomes and both input kinds
    assert seen["refused"] >= 50 and seen["text"] >= 5 and seen["ids"] >= 5, seen


@settings(max_examples=budget(150))
@given(
    name=st.text(min_size=1, max_size=MAX_NAME_LEN),
    texts=st.lists(st.text(min_size=1, max_size=200), min_size=1, max_size=MAX_ROWS),
)
def test_valid_text_requests_always_decode(tokenizer: Any, name: str, texts: list[str]) -> None:
    """The other direction: every well-formed TEXT request decodes (no false refusals),
    one row per text, truncated to MAX_LEN tokens."""
    k = len(texts)
    raw = [t.encode("utf-8", "replace") for t in texts]
    tname = name.encode("utf-8", "replace")[:MAX_NAME_LEN].decode("utf-8", "ignore") or "t"
    req = {
        "TASK": np.array([[tname.encode()]] * k, dtype=object),
        "TEXT": np.array([[r] for r in raw], dtype=object),
    }
    try:
        rows = decode_request(req, tokenizer, LIMITS)
    except RequestError as err:  # only an over-long encoded text may be refused
        assert any(len(r) > MAX_TEXT for r in raw), err.message
        return
    assert len(rows) == k and all(r.task == tname and 1 <= len(r.ids) <= MAX_LEN for r in rows)


@st.composite
def common_requests(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """The form the batched decoder takes in bulk (one TASK row, one INT64 ids row), with
    ids, lengths and names around its limits (out-of-vocabulary ids, over-long and empty
    rows, names that are not UTF-8 or too long)."""
    name = draw(st.one_of(names.map(lambda n: n.encode("utf-8", "surrogatepass")), st.binary()))
    length = draw(st.integers(0, MAX_LEN + 1))
    ids = draw(hnp.arrays(np.int64, (length,), elements=st.integers(-1, VOCAB)))
    return {
        "TASK": np.array([[name]] if draw(st.booleans()) else [name], dtype=object),
        "INPUT_IDS": ids if draw(st.booleans()) else ids[None, :],
    }


def one_by_one(req: dict[str, np.ndarray], tokenizer: Any) -> list[Row] | RequestError:
    try:
        return decode_request(req, tokenizer, LIMITS)
    except RequestError as err:
        return err


def test_batched_decoder_equals_the_one_request_decoder(tokenizer: Any) -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=budget(200))
    @given(batch=st.lists(st.one_of(common_requests(), requests()), min_size=1, max_size=12))
    def run(batch: list[dict[str, np.ndarray]]) -> None:
        got = decode_requests(batch, tokenizer, LIMITS)
        assert len(got) == len(batch)
        for req, mine in zip(batch, got, strict=True):
            want = one_by_one(req, tokenizer)
            if isinstance(want, RequestError):
                assert isinstance(mine, RequestError), (req, mine)
                assert (mine.message, mine.code) == (want.message, want.code)
                seen["refused"] += 1
                continue
            assert not isinstance(mine, RequestError), (req, mine.message)
            assert len(mine) == len(want)
            for a, b in zip(mine, want, strict=True):
                assert a.task == b.task and a.ids.dtype == b.ids.dtype
                np.testing.assert_array_equal(a.ids, b.ids)
                assert (a.types is None) == (b.types is None)
                if a.types is not None:
                    np.testing.assert_array_equal(a.types, b.types)
            seen["text" if "TEXT" in req else "ids"] += 1

    run()
    print(f"\n{seen}")
    assert seen["refused"] >= 50 and seen["text"] >= 5 and seen["ids"] >= 50, seen
