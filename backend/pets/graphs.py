"""CUDA graphs of whole mixed-task forwards, keyed by everything that shapes their launches.

A bert-base forward is a few hundred kernel launches; below a few thousand tokens the host
issuing them, not the GPU, sets the time. Replaying a captured graph issues them all at once.

What a captured forward reads, and why replaying it is safe:

* the batch's index arrays: views into the :class:`~pets.staging.Stager`'s device buffer,
  rewritten by one copy before every replay. Their addresses depend only on the staged
  (dtype, shape) sequence, which is part of the key;
* host scalars baked into launches (``max_seqlen``, a type's ``max_rank``, head flags, host
  index tensors): their values are part of the key (:func:`graph_key`);
* persistent tensors (backbone weights, task pools and slot tables, head tables): read by
  address. Registering a task can grow a pool, which moves it; the engine passes a
  :func:`state_key` of those addresses and every graph captured under another state is
  dropped before anything replays.

A forward whose plan holds a device tensor that is neither staged nor persistent (a type
that computes per-batch tables on the device while planning) gets no key and runs eagerly.
Graphs share one memory pool (they never run concurrently; each keeps its own output), so
the memory held is about the largest forward's activations plus the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .staging import Stager

log = logging.getLogger("pets")


HOST_ONLY = "pets_host_only"
"""Dataclass field metadata key: ``field(metadata={HOST_ONLY: True})`` marks a plan field the
device half never reads (host tables a type keeps for building more arrays while planning),
so it is left out of the graph key. A field read by kernels must never carry it."""


@functools.cache
def _keyed_fields(cls: type) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` that a graph key covers (all but :data:`HOST_ONLY`)."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get(HOST_ONLY))


def graph_key(obj: Any, staged: torch.Tensor) -> Hashable | None:
    """A hashable key of everything in ``obj`` that a captured forward bakes in.

    Walks dataclasses (except :data:`HOST_ONLY` fields), dicts, lists and tuples. Host
    tensors and scalars contribute their values; device tensors must be views of ``staged``
    (the stager's buffer) and contribute their offset, dtype and shape. Returns None when
    some device tensor is not staged: such a forward cannot be replayed safely.
    """
    storage = staged.untyped_storage()
    lo = storage.data_ptr()
    hi = lo + storage.nbytes()
    out: list[Hashable] = []
    add = out.append

    def walk(o: Any) -> bool:
        if o is None or isinstance(o, (bool, int, float, str)):
            add(o)
        elif isinstance(o, torch.Tensor):
            if lo <= o.data_ptr() < hi:  # a view of the staged buffer (a CPU stand-in too)
                add((str(o.dtype), tuple(o.shape), o.storage_offset(), o.stride()))
            elif o.device.type == "cpu":
                add((str(o.dtype), tuple(o.shape), o.numpy().tobytes()))
            else:
                return False
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            cls = type(o)
            add(cls.__name__)
            return all(walk(getattr(o, name)) for name in _keyed_fields(cls))
        elif isinstance(o, (list, tuple)):
            add(("seq", len(o)))
            return all(walk(v) for v in o)
        elif isinstance(o, dict):
            add(("dict", len(o)))
            return all(walk(k) and walk(v) for k, v in o.items())
        elif isinstance(o, torch.dtype):
            add(str(o))
        elif hasattr(o, "name") and hasattr(o, "code"):  # a PetMethod: its type is the key
            add(("pet", o.name))
        else:
            return False
        return True

    return tuple(out) if walk(obj) else None


_RESTAGE_MAX_BYTES = 16 << 20  # a bigger unstaged tensor is no per-batch array: stay eager


def restage(obj: Any, stager: Stager, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``obj`` with every per-batch device tensor that is not a staged view replaced by one.

    A PET type's plan may upload its arrays itself or compute them on the device while
    planning; a graph would keep reading those tensors' old addresses. This reserves a
    staged view for each and appends ``(view, tensor)`` to ``copies``: the caller copies them
    (device to device) after :meth:`Stager.flush`. Dataclasses, dicts, lists and tuples are
    rebuilt; other objects are returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        if (
            obj.device.type == "cpu"
            or obj.untyped_storage().data_ptr() == stager.device_buffer.untyped_storage().data_ptr()
            or obj.numel() * obj.element_size() > _RESTAGE_MAX_BYTES
        ):
            return obj
        view = stager.reserve(obj)
        copies.append((view, obj))
        return view
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            old = getattr(obj, f.name)
            new = restage(old, stager, copies)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    if isinstance(obj, dict):
        items = {k: restage(v, stager, copies) for k, v in obj.items()}
        return items if any(items[k] is not obj[k] for k in obj) else obj
    if isinstance(obj, (list, tuple)):
        seq = [restage(v, stager, copies) for v in obj]
        if all(a is b for a, b in zip(seq, obj, strict=True)):
            return obj
        return type(obj)(seq) if isinstance(obj, list) else tuple(seq)
    return obj


def _ladder(n: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them) >= ``n``:
    above 16 tokens, less than a third of a bucket is padding."""
    b = 16
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def length_bucket(length: int, max_len: int) -> int:
    """The length to pad a one-sequence batch to so that it replays a graph.

    A captured forward is keyed by its shapes, so a request of 17 tokens and one of 20
    would each need their own graph, and a one-off length would always run eagerly. Padding
    the sequence to a bucket (16, 24, 32, 48, 64, ..., capped at ``max_len``) gives such
    requests one shape; the padded layout masks the pads out of attention and pooling
    (:func:`pets.batch.build_batch`), so outputs do not change. A sequence that already has
    its bucket's length takes the padded layout too (with no pads): packed, it was a shape of
    its own that the start-up warm-up did not capture (on an H100 every exact 128-token
    request of a new task kind paid an eager forward and a capture). Batches of several
    sequences are left packed: their keys also depend on which tasks meet in them, so they
    seldom repeat, and padding them lost on an H100 (docs/decisions.md).

    Args:
        length: the sequence's tokens (<= ``max_len``).
        max_len: the longest sequence the engine accepts.

    Returns:
        the bucket length (>= ``length``).
    """
    return min(_ladder(length), max_len)


def bucket_lengths(max_len: int) -> list[int]:
    """Every length bucket of :func:`length_bucket` up to ``max_len`` (the last one capped)."""
    out: list[int] = []
    while not out or out[-1] < max_len:
        out.append(min(_ladder(out[-1] + 1 if out else 1), max_len))
    return out


def state_key(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """Addresses of the persistent tensors a forward reads (pools, tables, weights)."""
    return tuple(t.data_ptr() for t in tensors)


@dataclasses.dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor
    capture_ms: float


class CaptureBudget:
    """How much wall time capturing may take: a share of the time that passes, plus a burst.

    A capture holds the execute path for a warm-up forward, the recording and the graph's
    instantiation (12-16 ms for bert-base on an H200). Under a load whose batches rarely
    repeat a shape, capturing on every second sighting spent that on graphs that were seldom
    replayed. The balance starts at ``burst_ms``, grows by ``share`` of the wall time that
    passes (up to ``burst_ms``), and each capture spends its measured time; a capture waits
    while the balance is not positive. So at most ``share`` of a long run goes to capturing,
    and a fresh instance still captures its first shapes at once.

    Args:
        share: fraction of wall time capturing may take in the long run, in ``(0, 1]``.
        burst_ms: the balance at start and its cap.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        share: float = 0.05,
        burst_ms: float = 250.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 < share <= 1 or burst_ms <= 0:
            raise ValueError(
                f"CaptureBudget(share={share}, burst_ms={burst_ms}): expected 0 < share <= 1 "
                "and burst_ms > 0"
            )
        self.share, self.burst_ms, self.clock = share, burst_ms, clock
        self.balance_ms = burst_ms
        self._last = clock()

    def allows(self) -> bool:
        """Whether a capture may start now (accrues the time passed since the last call)."""
        now = self.clock()
        accrued = (now - self._last) * 1e3 * self.share
        self.balance_ms = min(self.burst_ms, self.balance_ms + accrued)
        self._last = now
        return self.balance_ms > 0

    def spend(self, ms: float) -> None:
        """Charge a capture that took ``ms``."""
        self.balance_ms -= ms


class GraphCache:
    """Captures a forward on a repeated sighting of its key and replays it afterwards.

    Args:
        device: the CUDA device.
        max_graphs: most graphs kept (least recently used dropped first).
        min_sightings: a key is captured when seen this many times (1 = at once) among the
            last ``16 * max_graphs`` keys; one-off shapes stay eager and cost no capture.
        budget: how much wall time captures may take (:class:`CaptureBudget`); a key due for
            capture while it is spent runs eagerly and is captured on a later sighting.
    """

    def __init__(
        self,
        device: torch.device,
        max_graphs: int = 64,
        min_sightings: int = 2,
        budget: CaptureBudget | None = None,
    ) -> None:
        self.device = device
        self.max_graphs = max_graphs
        self.min_sightings = min_sightings
        self.budget = budget if budget is not None else CaptureBudget()
        self._pool: Any = None  # the graphs' shared memory pool, made at the first capture
        self.graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.seen: OrderedDict[Hashable, int] = OrderedDict()
        self.failed: set[Hashable] = set()
        self.state: Hashable | None = None
        self.replays = 0
        self.eager = 0
        self.captures = 0
        self.deferred = 0  # sightings due for capture that the budget held back
        self.capture_ms = 0.0  # wall time spent capturing, in all

    def clear(self) -> None:
        """Drop every graph; the next capture starts a new memory pool.

        A pool whose graphs are all gone cannot take another capture (PyTorch's caching
        allocator asserts ``use_count > 0`` when a capture joins a pool no live graph holds),
        so reusing the old handle made every capture after a pool move fail and its shape
        run eagerly for good. The old pool's memory is freed once its last block is.
        """
        self.graphs.clear()
        self.seen.clear()
        self._pool = None

    @contextmanager
    def warming(self) -> Iterator[None]:
        """Capture every new shape on its first sighting and outside the
        :class:`CaptureBudget` (the start-up warm-up: no request waits on it)."""
        budget, sightings = self.budget, self.min_sightings
        self.budget = CaptureBudget(share=1.0, burst_ms=float("inf"), clock=budget.clock)
        self.min_sightings = 1
        try:
            yield
        finally:
            self.budget, self.min_sightings = budget, sightings

    def run(
        self,
        key: Hashable | None,
        state: Hashable,
        fn: Callable[[], torch.Tensor],
        rekey: Callable[[], Hashable | None],
    ) -> torch.Tensor:
        """``fn()``'s result: replayed from a graph of ``key``, captured now, or eager.

        ``rekey`` recomputes the key after a warm-up run: a plan that builds device arrays
        lazily on first use changes its key then, and is not captured (its graph would read
        arrays of the capturing batch). The returned tensor of a replay is the graph's own
        output buffer: read it before the next call.
        """
        if state != self.state:
            if self.graphs:
                log.info("CUDA graphs: task pools moved; dropping %d graphs", len(self.graphs))
            self.clear()
            self.state = state
        if key is None or key in self.failed:
            self.eager += 1
            return fn()
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            entry.graph.replay()
            self.replays += 1
            return entry.out
        seen = self.seen.get(key, 0) + 1
        self.seen[key] = seen
        self.seen.move_to_end(key)
        while len(self.seen) > 16 * self.max_graphs:
            self.seen.popitem(last=False)
        if seen < self.min_sightings:
            self.eager += 1
            return fn()
        if not self.budget.allows():
            self.deferred += 1
            self.eager += 1
            return fn()
        return self._capture(key, fn, rekey)

    def _record(
        self, fn: Callable[[], torch.Tensor], still_keyed: Callable[[], bool]
    ) -> tuple[torch.Tensor, torch.cuda.CUDAGraph | None, torch.Tensor | None]:
        """Run ``fn`` once on a side stream (lazy library set-up must not happen inside a
        capture), then capture it unless ``still_keyed()`` says the warm-up moved the key.

        Returns the warm-up's output, the graph and the graph's output buffer (the last two
        None when not captured).
        """
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            warm = fn()
        current.wait_stream(side)
        warm.record_stream(current)  # made on the side stream, read on this one
        if not still_keyed():
            return warm, None, None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        return warm, graph, out

    def _capture(
        self,
        key: Hashable,
        fn: Callable[[], torch.Tensor],
        rekey: Callable[[], Hashable | None],
    ) -> torch.Tensor:
        clock = self.budget.clock
        t0 = clock()
        try:
            warm, graph, out = self._record(fn, lambda: rekey() == key)
        except Exception as exc:  # an op that cannot be captured: this key stays eager
            self.failed.add(key)
            log.warning("CUDA graphs: capture failed, this batch shape runs eagerly: %s", exc)
            self.eager += 1
            return fn()
        ms = (clock() - t0) * 1e3
        self.budget.spend(ms)
        self.capture_ms += ms
        if graph is None or out is None:  # the plan built device arrays while running
            self.failed.add(key)
            log.info("CUDA graphs: a plan builds arrays while running; this shape is eager")
            self.eager += 1
            return warm
        self.graphs[key] = _Entry(graph, out, ms)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        log.info(
            "CUDA graphs: captured a forward in %.1f ms (%d held, %d captured, %d deferred, "
            "pool %.1f MiB reserved)",
            ms,
            len(self.graphs),
            self.captures,
            self.deferred,
            self._reserved_mib(),
        )
        return warm  # the warm-up computed this batch already: no replay needed

    def _reserved_mib(self) -> float:
        return torch.cuda.memory_reserved(self.device) / 2**20

    def summary(self) -> dict[str, float]:
        """Counts for logs and benchmarks."""
        return {
            "graphs": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "eager": self.eager,
            "deferred": self.deferred,
            "capture_ms": round(self.capture_ms, 1),
        }
