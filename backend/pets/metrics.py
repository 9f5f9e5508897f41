"""Per-task serving statistics, without Triton.

The engine hands each ``execute``'s rows to :class:`EngineStats`, which counts them per task
only when they are read: ``backend/model.py`` drains the deltas into
``pb_utils.MetricFamily`` series from a background thread every ``METRICS_INTERVAL_MS`` (one
IPC per changed series), never on the request path. :func:`scrape` and :func:`status_table`
read them back from Triton's metrics endpoint for ``pets status``.

Series (all carry ``model``; gauges also ``instance``):

* ``pets_task_requests_total{task}``        sequences answered with an output (a request
  with k rows counts k)
* ``pets_task_errors_total{task,reason}``   requests answered with an error; ``reason`` is the
  error code; ``task`` is "" when the task is not registered (never a client-chosen name)
* ``pets_task_tokens_total{task}``          tokens of the served sequences
* ``pets_task_compute_us_total{task}``      forward time, each batch split by token share
* ``pets_tasks_resident{instance,device}``, ``pets_task_memory_bytes{instance,device}``
  gauges (``device``: ``cpu`` or ``cuda:<k>``)
* ``pets_backbone_info{instance,fingerprint}``  1: the backbone fingerprint a task's manifest
  must carry (readable without the admin token)
* ``pets_task_rejected{instance,task,reason}``  1 while the instance refuses that store entry
  (the reason cut to :data:`REASON_LABEL_LIMIT` characters), 0 once it loads or is gone
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

COUNTERS = {
    "requests": ("pets_task_requests_total", "sequences answered with an output, per task"),
    "errors": ("pets_task_errors_total", "requests answered with an error, per task and code"),
    "tokens": ("pets_task_tokens_total", "tokens of the served sequences, per task"),
    "compute_us": (
        "pets_task_compute_us_total",
        "forward time per task in microseconds (each batch split by token share)",
    ),
}
GAUGES = {
    "tasks_resident": ("pets_tasks_resident", "tasks loaded in this model instance"),
    "memory_bytes": ("pets_task_memory_bytes", "device bytes held by this instance's tasks"),
}
INFO = {
    "backbone": (
        "pets_backbone_info",
        "1; label fingerprint: the served backbone, which a task's manifest must name",
    ),
    "rejected": (
        "pets_task_rejected",
        "1 while this instance refuses the store entry 'task' (label reason), else 0",
    ),
}
REASON_LABEL_LIMIT = 300  # characters of a rejection reason kept in a metric label


def rejected_series(rejected: dict[str, str]) -> set[tuple[str, str]]:
    """(task, reason) label pairs of the rejected store entries, reasons cut to
    :data:`REASON_LABEL_LIMIT` characters (metric labels are bounded like error messages)."""
    out = set()
    for task, reason in rejected.items():
        if len(reason) > REASON_LABEL_LIMIT:
            reason = reason[:REASON_LABEL_LIMIT] + "..."
        out.add((task[:128], reason))
    return out


@dataclass
class StatsDelta:
    """Counts since the previous :meth:`EngineStats.drain`, plus the current gauges."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    compute_us: Counter[str] = field(default_factory=Counter)
    tasks_resident: int = 0
    memory_bytes: int = 0

    def empty(self) -> bool:
        return not (self.requests or self.errors or self.tokens or self.compute_us)


class EngineStats:
    """Thread-safe accumulator. :meth:`record` is called once per execute and only keeps
    the execute's rows; they are counted per task when the deltas are read (:meth:`drain`,
    :attr:`totals`: the metrics thread, off the request path) or every :attr:`FOLD_EVERY`
    executes, which bounds what is kept when nothing reads. The counting runs outside the
    lock, so :meth:`record` never waits for it. With no reader at all (``METRICS=0``),
    :meth:`disable` makes :meth:`record` keep nothing."""

    FOLD_EVERY = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._enabled = True
        self._pending: list[tuple[Sequence[str], Sequence[int], float]] = []
        self._pending_errors: list[tuple[str, str]] = []
        self._gauges = (0, 0)
        self._cur = StatsDelta()
        self._totals = StatsDelta()

    def disable(self) -> None:
        """Nothing will read these statistics: from now on :meth:`record` and
        :meth:`record_errors` keep nothing."""
        self._enabled = False

    @property
    def enabled(self) -> bool:
        """Whether :meth:`record` keeps anything: callers skip gathering its arguments."""
        return self._enabled

    def record(
        self,
        tasks: Sequence[str],
        tokens: Sequence[int],
        errors: Sequence[tuple[str, str]],
        compute_s: float,
        tasks_resident: int,
        memory_bytes: int,
    ) -> None:
        """Add one execute: the task and token count of each answered sequence, a
        ``(task, code)`` pair per request answered with an error, the forward's time (split
        over tasks by token share when counted) and the current gauges."""
        if not self._enabled:
            return
        with self._lock:
            self._pending.append((tasks, tokens, compute_s))
            if errors:
                self._pending_errors.extend(errors)
            self._gauges = (tasks_resident, memory_bytes)
            full = len(self._pending) >= self.FOLD_EVERY
        if full:
            self._fold()

    def record_errors(self, errors: Counter[tuple[str, str]]) -> None:
        """Add errors of a batch the engine refused whole (gauges unchanged)."""
        if not self._enabled:
            return
        with self._lock:
            self._pending_errors.extend(errors.elements())

    def _fold(self) -> None:
        """Count the pending executes per task and add them to the deltas and totals."""
        with self._lock:
            pending, errors = self._pending, self._pending_errors
            self._pending, self._pending_errors = [], []
        requests: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        compute: dict[str, float] = defaultdict(float)
        for tasks, counts, compute_s in pending:
            total = sum(counts)
            per_token = compute_s * 1e6 / total if total else 0.0
            for task, n in zip(tasks, counts, strict=True):
                requests[task] += 1
                tokens[task] += n
                compute[task] += per_token * n
        failed = Counter(errors)
        with self._lock:
            for acc in (self._cur, self._totals):
                acc.requests.update(requests)
                acc.tokens.update(tokens)
                acc.errors.update(failed)
                acc.compute_us.update(compute)

    def drain(self) -> StatsDelta:
        """The deltas since the last drain (and the latest gauges); resets the deltas."""
        self._fold()
        with self._lock:
            out, self._cur = self._cur, StatsDelta()
            out.tasks_resident, out.memory_bytes = self._gauges
        return out

    @property
    def totals(self) -> StatsDelta:
        """Everything since start (tests, in-process tools); do not modify."""
        self._fold()
        with self._lock:
            self._totals.tasks_resident, self._totals.memory_bytes = self._gauges
            return self._totals


# ---------------------------------------------------------------------------- reading back
_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text format."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or line.startswith("#"):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group(2) or "")}
        out.append((m.group(1), labels, value))
    return out


def _unescape(value: str) -> str:
    """A label value as written, from its exposition-format escapes (``\\\\``, ``\\"``, ``\\n``)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def scrape(url: str, timeout: float = 5.0) -> str:
    """GET the metrics text of a Triton server (``host:port`` or a full URL)."""
    full = url if "://" in url else f"http://{url}"
    full = full if full.rstrip("/").endswith("/metrics") else full.rstrip("/") + "/metrics"
    with urllib.request.urlopen(full, timeout=timeout) as resp:
        return resp.read().decode()


def status_table(text: str, model: str = "pets") -> str:
    """Per-task rows and per-instance residency from a metrics scrape, as aligned text."""
    samples = [
        (n, lab, v) for n, lab, v in parse_prometheus(text) if lab.get("model", model) == model
    ]
    names = {v[0]: k for k, v in COUNTERS.items()}
    rows: dict[str, defaultdict[str, float]] = {}
    inst: dict[str, dict[str, float]] = {}
    triton: defaultdict[str, float] = defaultdict(float)
    backbones: dict[str, set[str]] = {}
    rejected: dict[str, dict[str, set[str]]] = {}
    for name, lab, value in samples:
        if name == INFO["backbone"][0] and value:
            backbones.setdefault(lab.get("fingerprint", "?"), set()).add(lab.get("instance", "?"))
        elif name == INFO["rejected"][0] and value:
            by_reason = rejected.setdefault(lab.get("task", "?"), {})
            by_reason.setdefault(lab.get("reason", "?"), set()).add(lab.get("instance", "?"))
        elif name in names:
            rows.setdefault(lab.get("task", ""), defaultdict(float))[names[name]] += value
        elif name in (GAUGES["tasks_resident"][0], GAUGES["memory_bytes"][0]):
            key = lab.get("instance", "?")
            key += f" ({lab['device']})" if "device" in lab else ""
            inst.setdefault(key, {})[name] = value
        elif name.startswith("nv_inference_") and lab.get("model") == model:
            triton[name] += value
    lines = [f"{'task':<32} {'requests':>10} {'errors':>8} {'tokens':>12} {'avg ms':>9}"]
    for task in sorted(rows):
        r = rows[task]
        avg = r["compute_us"] / r["requests"] / 1e3 if r["requests"] else 0.0
        lines.append(
            f"{task or '(unregistered)':<32} {int(r['requests']):>10} "
            f"{int(r['errors']):>8} {int(r['tokens']):>12} {avg:>9.3f}"
        )
    if not rows:
        lines.append(f"(no pets_task_* series for model {model!r} yet: send a request first)")
    for name in sorted(inst):
        g = inst[name]
        lines.append(
            f"instance {name}: {int(g.get(GAUGES['tasks_resident'][0], 0))} tasks "
            f"resident, {g.get(GAUGES['memory_bytes'][0], 0) / 2**20:.2f} MiB"
        )
    for fp in sorted(backbones):
        lines.append(f"backbone {fp} (instances {', '.join(sorted(backbones[fp]))})")
    for task in sorted(rejected):
        for reason, insts in sorted(rejected[task].items()):
            lines.append(f"REJECTED {task} (instances {', '.join(sorted(insts))}): {reason}")
    done = triton["nv_inference_request_success"] + triton["nv_inference_request_failure"]
    if done:
        lines.append(
            f"model {model}: {int(done)} requests, avg queue "
            f"{triton['nv_inference_queue_duration_us'] / done / 1e3:.3f} ms, avg "
            f"request {triton['nv_inference_request_duration_us'] / done / 1e3:.3f} ms "
            "(Triton's own counters; per-request errors count as successes there)"
        )
    return "\n".join(lines)
