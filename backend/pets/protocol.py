"""Request decoding and validation (the tensor protocol of the ``pets`` Triton model).

A request carries ``TASK`` (BYTES ``[k, 1]``: one task name per row) and either ``TEXT``
(BYTES ``[k, 1]``, tokenized in the server and truncated to ``MAX_SEQ_LEN`` tokens) or
``INPUT_IDS`` (INT64 or INT32 ``[k, L]``, never truncated: over-long input is an error).
``k >= 1`` rows share one request. In-process (:meth:`pets.engine.Engine.execute`) a single
``TASK`` row applies to all rows and a rank-1 ``INPUT_IDS [L]`` is one row; over Triton both
are refused by the server core before the model sees them (every input of a request must
have the same batch size ``k``), so clients send ``TASK [k, 1]`` and ``INPUT_IDS [k, L]``.

Every request's cost is bounded before any expensive work (docs/configuration.md, Limits):
at most ``MAX_ROWS`` rows, task names of at most 128 characters, TEXT rows of at most
``MAX_TEXT_BYTES`` bytes and ``MAX_REQUEST_TEXT_BYTES`` together (refused before decoding
or tokenizing) and ids rows of at most
``MAX_SEQ_LEN`` ids (refused before any copy). Errors quote client input only up to
:data:`QUOTE_LIMIT` characters.

Sentence pairs: ``TEXT_PAIR`` (BYTES ``[k, 1]``, with ``TEXT``) is tokenized with it as
``[CLS] a [SEP] b [SEP]``, token type 0 for ``a`` and 1 for ``b`` (an empty ``TEXT_PAIR``
row leaves its ``TEXT`` a single text); with ids, the optional
``TOKEN_TYPE_IDS`` (INT64 or INT32, the shape of the ids) carries the types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import RequestError
from .taskstore import MAX_NAME_LEN

ID_INPUTS = ("INPUT_IDS", "INPUT_IDS_INT32")
QUOTE_LIMIT = 64  # characters of client input quoted back in an error message
REASON_LIMIT = 400  # characters of a task's rejection reason told to a client


def check_stub_numpy(version: str) -> None:
    """Refuse to serve under numpy 2 (``version``: ``numpy.__version__`` in the Python stub).

    Triton 2.51's Python backend stub builds the numpy arrays of BYTES inputs through a
    pybind11 that reads numpy 1.x's dtype layout: under numpy 2, TASK and TEXT decode as
    garbage and the stub aborts on its first request, taking the instance down (seen on a
    GPU host whose system numpy was 2.x). The models call this in ``initialize``.
    """
    if int(version.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {version} in the Python stub's environment; Triton 2.51's stub decodes "
            "BYTES inputs only under numpy 1.x (it aborts on the first request otherwise). "
            "Install numpy<2 where the stub imports it (make setup does; offline, put a "
            "numpy 1.26 wheel in .whl/ before build/setup_env.sh)"
        )


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said, so an error
    never echoes unbounded client input back (gRPC caps error metadata at 8 KiB)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


@dataclass(frozen=True)
class Row:
    task: str
    ids: np.ndarray  # [L] int64
    types: np.ndarray | None = None  # [L] int64 token type ids; None: all 0


@dataclass(frozen=True)
class Limits:
    """What one request may hold (docs/configuration.md, Limits); checked before any work."""

    max_len: int  # ids per row (MAX_SEQ_LEN); TEXT rows are truncated to it
    vocab: int  # token ids must lie in [0, vocab)
    max_text_bytes: int = 1 << 16  # bytes per TEXT / TEXT_PAIR row (MAX_TEXT_BYTES)
    max_rows: int = 256  # rows per request (MAX_ROWS)
    max_request_text_bytes: int = 1 << 20  # TEXT bytes per request (MAX_REQUEST_TEXT_BYTES)
    type_vocab: int = 2  # token type ids must lie in [0, type_vocab)


def _rows(name: str, k: int, max_rows: int) -> None:
    if k > max_rows:
        raise RequestError(
            f"{name} has {k} rows; the limit is {max_rows} per request (MAX_ROWS): "
            "split the rows over several requests"
        )


def _strings(
    name: str,
    arr: np.ndarray,
    max_bytes: int,
    limit: str,
    max_rows: int,
    max_total: int | None = None,
) -> list[str]:
    """The rows of a BYTES input ``[k, 1]`` as text; more than ``max_rows`` rows, a row over
    ``max_bytes`` or rows over ``max_total`` bytes together are refused before anything is
    decoded or tokenized (``limit`` names the row bound in the message)."""
    if arr.dtype != object and arr.dtype.kind not in ("S", "U"):
        raise RequestError(f"{name} must be a BYTES (string) tensor, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.size == 0 or (arr.ndim == 2 and arr.shape[1] != 1) or arr.ndim > 2:
        raise RequestError(
            f"{name} must have shape [k, 1] (one string per row), got {list(arr.shape)}"
        )
    _rows(name, arr.shape[0], max_rows)
    rows = arr.reshape(-1)
    sizes = [len(v) for v in rows]  # lengths only: nothing is decoded yet
    big = max(sizes)
    if big > max_bytes:
        raise RequestError(
            f"a {name} row has {big} bytes; the limit is {max_bytes} ({limit}): "
            "shorten it or split it over several rows"
        )
    if max_total is not None and sum(sizes) > max_total:
        raise RequestError(
            f"the {name} rows of this request have {sum(sizes)} bytes together; the limit is "
            f"{max_total} per request (MAX_REQUEST_TEXT_BYTES): split them over several "
            "requests"
        )
    out = []
    for v in rows:
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{name} is not valid UTF-8; send UTF-8 encoded text") from None
        out.append(str(v))
    return out


def decode_request(
    req: Mapping[str, np.ndarray], tokenizer: Tokenizer | None, limits: Limits
) -> list[Row]:
    """Validate one request and return its rows; raises :class:`RequestError` (INVALID_ARG).

    Bounded work: more than ``max_rows`` rows, a TEXT row over ``max_text_bytes``, TEXT
    rows over ``max_request_text_bytes`` together, a TASK row over 128 characters and an
    ids row over ``max_len`` are refused before anything else is done with them.
    """
    got = _decode(req, tokenizer is not None, limits)
    if isinstance(got, _Texts):
        assert tokenizer is not None  # _decode refuses TEXT without a tokenizer
        return got.rows(tokenizer.encode_batch(got.texts))
    return got


def decode_requests(
    reqs: Sequence[Mapping[str, np.ndarray]], tokenizer: Tokenizer | None, limits: Limits
) -> list[list[Row] | RequestError]:
    """Every request of one execute: its rows, or the :class:`RequestError` it fails with.

    The same checks and results as :func:`decode_request` per request, with the work done
    once per execute where it can be: the common request (one ``TASK`` row and one
    ``INPUT_IDS`` row) is recognised with a few attribute reads and the vocabulary check
    runs once over all such rows together; the TEXT rows of all requests are tokenized in
    one batched fast-tokenizer call. A request that fails the bulk check is decoded on its
    own, so its error names its own input.
    """
    out: list[list[Row] | RequestError] = [[] for _ in reqs]
    fast: list[int] = []
    fast_ids: list[np.ndarray] = []
    texts: list[tuple[int, _Texts]] = []
    max_len = limits.max_len
    for i, req in enumerate(reqs):
        ids = req.get("INPUT_IDS")
        task = req.get("TASK")
        if (
            len(req) == 2
            and ids is not None
            and task is not None
            and ids.dtype == np.int64
            and (ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1))
            and 0 < ids.shape[-1] <= max_len
            and task.dtype == object
            and task.size == 1
            and task.ndim in (1, 2)
        ):
            name = task.flat[0]
            if isinstance(name, bytes) and len(name) <= MAX_NAME_LEN:
                try:
                    out[i] = [Row(name.decode("utf-8"), ids.reshape(-1))]
                    fast.append(i)
                    fast_ids.append(ids)
                    continue
                except UnicodeDecodeError:
                    pass  # the full decoder below words the error
        try:
            got = _decode(req, tokenizer is not None, limits)
        except RequestError as err:
            out[i] = err
            continue
        if isinstance(got, _Texts):
            texts.append((i, got))
        else:
            out[i] = got
    if fast_ids:
        flat = np.concatenate([a.reshape(-1) for a in fast_ids])
        if int(flat.min()) < 0 or int(flat.max()) >= limits.vocab:  # rare: find them
            for i in fast:
                try:
                    decode_request(reqs[i], None, limits)
                except RequestError as err:
                    out[i] = err
    if texts:
        assert tokenizer is not None  # _decode refuses TEXT without a tokenizer
        enc = tokenizer.encode_batch([t for _, pending in texts for t in pending.texts])
        start = 0
        for i, pending in texts:
            stop = start + len(pending.texts)
            out[i] = pending.rows(enc[start:stop])
            start = stop
    return out


@dataclass(frozen=True)
class _Texts:
    """A request's checked TEXT rows, waiting for the tokenizer (one call per execute)."""

    tasks: list[str]
    texts: list[str | tuple[str, str]]  # a tuple: a sentence pair
    pairs: bool  # TEXT_PAIR was sent: the rows carry token types

    def rows(self, enc: Sequence[Encoding]) -> list[Row]:
        seqs = [np.asarray(e.ids, dtype=np.int64) for e in enc]
        if not self.pairs:
            return _rows_of(self.tasks, seqs, None)
        return _rows_of(self.tasks, seqs, [np.asarray(e.type_ids, dtype=np.int64) for e in enc])


def _rows_of(tasks: list[str], seqs: list[np.ndarray], types: list[np.ndarray] | None) -> list[Row]:
    """One :class:`Row` per sequence; a single task applies to every row (the counts were
    checked by :func:`_check_task_rows`)."""
    if len(tasks) == 1:
        tasks = tasks * len(seqs)
    if types is None:
        return [Row(t, s) for t, s in zip(tasks, seqs, strict=True)]
    return [Row(t, s, y if y.any() else None) for t, s, y in zip(tasks, seqs, types, strict=True)]


def _check_task_rows(tasks: list[str], rows: int) -> None:
    if len(tasks) not in (1, rows):
        raise RequestError(
            f"TASK has {len(tasks)} rows but the input has {rows}; send one "
            "task per row or a single task for all rows"
        )


def _decode(req: Mapping[str, np.ndarray], has_tokenizer: bool, lim: Limits) -> list[Row] | _Texts:
    """:func:`decode_request` up to tokenization: TEXT requests come back as :class:`_Texts`."""
    if "TASK" not in req:
        raise RequestError(
            "request has no TASK input; send the task name as a BYTES tensor of shape [1, 1]"
        )
    tasks = _strings(
        "TASK",
        req["TASK"],
        MAX_NAME_LEN,
        f"task names have at most {MAX_NAME_LEN} characters",
        lim.max_rows,
    )
    ids_name = next((n for n in ID_INPUTS if n in req), None)
    types: list[np.ndarray] | None = None
    has_text = "TEXT" in req
    if has_text == (ids_name is not None):
        raise RequestError(
            f"send exactly one of TEXT or INPUT_IDS, got {'both' if has_text else 'neither'}"
        )
    if has_text:
        if not has_tokenizer:
            raise RequestError(
                "this backbone has no tokenizer, so TEXT is not accepted; send INPUT_IDS"
            )
        texts = _strings(
            "TEXT",
            req["TEXT"],
            lim.max_text_bytes,
            "MAX_TEXT_BYTES",
            lim.max_rows,
            lim.max_request_text_bytes,
        )
        if any(not t for t in texts):
            raise RequestError("TEXT is empty; send at least one character")
        if "TOKEN_TYPE_IDS" in req:
            raise RequestError(
                "TOKEN_TYPE_IDS goes with INPUT_IDS; with TEXT send the second text as TEXT_PAIR"
            )
        _check_task_rows(tasks, len(texts))
        if "TEXT_PAIR" not in req:
            return _Texts(tasks, list(texts), pairs=False)
        pairs = _strings(
            "TEXT_PAIR", req["TEXT_PAIR"], lim.max_text_bytes, "MAX_TEXT_BYTES", lim.max_rows,
            lim.max_request_text_bytes,
        )  # fmt: skip
        if len(pairs) != len(texts):
            raise RequestError(
                f"TEXT_PAIR has {len(pairs)} rows but TEXT has {len(texts)}; send one "
                "second text per TEXT row"
            )
        # An empty TEXT_PAIR row is a single text, so one request can mix both.
        both = [(a, b) if b else a for a, b in zip(texts, pairs, strict=True)]
        return _Texts(tasks, both, pairs=True)
    else:
        if "TEXT_PAIR" in req:
            raise RequestError(
                "TEXT_PAIR goes with TEXT; with token ids send TOKEN_TYPE_IDS instead"
            )
        assert ids_name is not None
        arr = req[ids_name]
        if arr.dtype not in (np.int64, np.int32):
            raise RequestError(f"{ids_name} has dtype {arr.dtype}; send INT64 (or INT32) token ids")
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise RequestError(f"{ids_name} must have shape [k, L], got {list(arr.shape)}")
        _rows(ids_name, arr.shape[0], lim.max_rows)
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise RequestError(
                f"{ids_name} is empty (shape {list(arr.shape)}); send at least one row of "
                "at least one token id"
            )
        if arr.shape[1] > lim.max_len:
            raise RequestError(
                f"{ids_name} has {arr.shape[1]} tokens; the limit is {lim.max_len} "
                "(MAX_SEQ_LEN): truncate or split the input"
            )
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= lim.vocab:
            raise RequestError(
                f"{ids_name} holds token id {lo if lo < 0 else hi}, outside the "
                f"vocabulary [0, {lim.vocab})"
            )
        seqs = list(arr.astype(np.int64, copy=False))
        if "TOKEN_TYPE_IDS" in req:
            types = list(_token_types(req["TOKEN_TYPE_IDS"], arr.shape, ids_name, lim.type_vocab))
        _check_task_rows(tasks, len(seqs))
    return _rows_of(tasks, seqs, types)


def _token_types(
    arr: np.ndarray, shape: tuple[int, ...], ids_name: str, type_vocab: int
) -> np.ndarray:
    """``TOKEN_TYPE_IDS`` checked against the ids' ``shape`` ``[k, L]``; int64 ``[k, L]``."""
    if arr.dtype not in (np.int64, np.int32):
        raise RequestError(f"TOKEN_TYPE_IDS has dtype {arr.dtype}; send INT64 (or INT32)")
    if arr.ndim == 1:
        arr = arr[None, :]
    if tuple(arr.shape) != tuple(shape):
        raise RequestError(
            f"TOKEN_TYPE_IDS has shape {list(arr.shape)} but {ids_name} has {list(shape)}; "
            "send one type id per token id"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= type_vocab:
        raise RequestError(
            f"TOKEN_TYPE_IDS holds {lo if lo < 0 else hi}, outside the backbone's token "
            f"types [0, {type_vocab}) (0: first text, 1: second)"
        )
    return arr.astype(np.int64, copy=False)
