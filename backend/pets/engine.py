"""The serving engine: decode and validate requests, schedule, run mixed-task forwards.

Usable without Triton (tests, benchmarks, the CLI); ``backend/model.py`` is a thin shell
over :meth:`Engine.execute`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import kernels
from .backbone import load_backbone, resolve_checkpoint
from .batch import flat_token_types, has_token_types, pad_rows
from .encoder import Prepared, SharedEncoder
from .errors import ConfigError, RequestError, clip
from .graphs import (
    GraphCache,
    bucket_lengths,
    graph_key,
    length_bucket,
    restage,
    state_key,
)
from .heads import HeadTable
from .metrics import EngineStats
from .pet import PetContext
from .pet.maskbert import FORMAT_ALIASES as MASKBERT_FORMAT_ALIASES
from .pet.maskbert import FORMATS as MASKBERT_FORMATS
from .protocol import REASON_LIMIT, Limits, Row, decode_requests, quote
from .registry import TaskRegistry
from .scheduling import (
    AnalyticModel,
    CostModel,
    CostTable,
    Query,
    Scheduler,
    SchedulerContext,
    scheduler_from_context,
)
from .staging import Stager, StageSnapshot, StagingOverflow
from .tokenizer import load_tokenizer

log = logging.getLogger("pets")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    """Engine settings; ``config.pbtxt`` parameters of the same names (upper case) set them."""

    backbone: str = "default"  # checkpoint folder, "default", or a synthetic config name
    task_store: str = "tasks"  # folder; relative to the model directory
    dtype: str = "auto"  # auto = float32 on CPU, float16 on CUDA
    scheduler: str = "task_grouped"
    cost_table: str = "cost_table.json"  # `pets profile` output; relative to the model directory
    batch_size: int = 0  # max sequences per engine batch (0 = the policy's default)
    max_seq_len: int = 0  # 0 = the backbone's max_position_embeddings
    max_batch_tokens: int = 16384  # tokens per engine forward
    ops: str = "auto"  # auto | compiled | reference
    refresh_ms: int = 200  # how often an idle instance checks the task store (0: no thread)
    shadow_streams: int = 0  # >0: PetS-style per-task shadow ops over N CUDA streams
    memory_budget_mb: int = 0  # task weights on the device; 0 = unlimited (see `pets capacity`)
    maskbert_format: str = "auto"  # auto (smaller of the two) | index | bitmask: pet/maskbert.py
    max_text_bytes: int = 1 << 16  # a TEXT row over this is refused before tokenizing
    max_rows: int = 256  # rows (sequences) per request; more is refused before decoding
    max_request_text_bytes: int = 1 << 20  # TEXT bytes of one request, all rows together
    cuda_graphs: int = 1  # 1: replay captured forwards on CUDA (pets/graphs.py); 0: eager
    graph_cache: int = 64  # most CUDA graphs held per instance (least recently used go)
    graph_warmup: int = 128  # capture one-request forwards up to this length at start (0: off)

    @staticmethod
    def from_parameters(params: Mapping[str, str]) -> EngineConfig:
        cfg = EngineConfig()
        known = {f.name.upper(): f for f in fields(EngineConfig)}
        for key, raw in params.items():
            f = known.get(key.upper())
            if f is None:
                continue  # Triton's own parameters (e.g. EXECUTION_ENV_PATH) pass through
            try:
                value = int(raw) if f.type == "int" else str(raw)
            except ValueError:
                raise ConfigError(f"parameter {key}={raw!r} must be an integer") from None
            setattr(cfg, f.name, value)
        if cfg.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"DTYPE={cfg.dtype!r}; expected auto, {', '.join(DTYPES)}")
        cfg.maskbert_format = MASKBERT_FORMAT_ALIASES.get(cfg.maskbert_format, cfg.maskbert_format)
        if cfg.maskbert_format not in MASKBERT_FORMATS:
            raise ConfigError(
                f"MASKBERT_FORMAT={cfg.maskbert_format!r}; expected one of "
                f"{', '.join(MASKBERT_FORMATS)}"
            )
        if cfg.max_text_bytes < 1:
            raise ConfigError(f"MAX_TEXT_BYTES={cfg.max_text_bytes}; must be >= 1")
        if cfg.max_rows < 1:
            raise ConfigError(f"MAX_ROWS={cfg.max_rows}; must be >= 1")
        if cfg.max_request_text_bytes < 1:
            raise ConfigError(f"MAX_REQUEST_TEXT_BYTES={cfg.max_request_text_bytes}; must be >= 1")
        if cfg.max_batch_tokens < 1:
            raise ConfigError(f"MAX_BATCH_TOKENS={cfg.max_batch_tokens}; must be >= 1")
        if cfg.graph_warmup < 0:
            raise ConfigError(
                f"GRAPH_WARMUP={cfg.graph_warmup}; expected 0 (off) or the longest request "
                "length, in tokens, whose graphs are captured at start-up"
            )
        return cfg


_MAX_TEMPLATES = 4096  # batch layouts whose plans are kept for reuse...
_MAX_TEMPLATE_BYTES = 64 << 20  # ...and the staged bytes they may hold in all


@dataclass
class _Template:
    """A prepared batch kept for the next batch of the same task slots and lengths."""

    prepared: Prepared
    stage: StageSnapshot
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (staged view, plan's device array)

    @property
    def nbytes(self) -> int:
        """Host bytes it keeps: the staged arrays, and their image when it has one."""
        image = self.stage.image
        return self.stage.used + (0 if image is None else int(image.nbytes))


class Engine:
    """Shared backbone + task registry + scheduler."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model_dir: str | Path = ".",
        device: str | torch.device = "cpu",
    ) -> None:
        """Assemble the engine (:meth:`_assemble`), load the task store, start the store
        refresher; serving is :meth:`execute`."""
        self.config = config
        model_dir = Path(model_dir)
        checkpoint = self._assemble(config, model_dir, torch.device(device))
        store = Path(config.task_store)
        self.store = store if store.is_absolute() else model_dir / store
        self._generation_file = str(self.store / ".generation")  # stat'ed on every execute
        self.load_errors = self.registry.load_store(self.store)
        self._generation = self._store_generation()
        self.stats = EngineStats()  # bulk per-execute counts; backend/model.py exports them
        self.warm_graphs(config.graph_warmup)
        self._refresh_lock = threading.Lock()  # one refresh / re-check at a time
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if config.refresh_ms > 0:  # idle instances (no execute) must see changes too
            self._refresher = threading.Thread(
                target=_refresh_loop,
                args=(weakref.ref(self), self._stop, config.refresh_ms),
                name="pets-store-refresh",
                daemon=True,
            )
            self._refresher.start()
        log.info(
            "pets engine: backbone %s (%s, %d layers), %s on %s, ops: %s, %d tasks loaded, "
            "%d skipped, scheduler %s (%s), CUDA graphs %s",
            checkpoint,
            self.spec.fingerprint,
            self.spec.layers,
            str(self.dtype).removeprefix("torch."),
            self.device,
            self.ops,
            len(self.registry.tasks),
            len(self.load_errors),
            config.scheduler,
            self.cost_source,
            f"on (up to {config.graph_cache}, captured on a shape's second batch, "
            f"capturing at most {self.graphs.budget.share:.0%} of wall time)"
            if self.graphs is not None
            else "off",
        )

    def _assemble(self, config: EngineConfig, model_dir: Path, device: torch.device) -> object:
        """Build the serving parts: backbone on the device, registry, encoder, stage and
        graphs, tokenizer, scheduler. Returns the resolved checkpoint (for the log)."""
        if device.type == "cuda":
            if device.index is None:  # "cuda": the current device, named by its index
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        auto = torch.float16 if device.type == "cuda" else torch.float32
        self.dtype = DTYPES[config.dtype] if config.dtype != "auto" else auto
        ops_module, self.ops = kernels.select(config.ops)
        checkpoint = resolve_checkpoint(config.backbone, model_dir)
        weights = load_backbone(checkpoint)
        self.spec = weights.spec
        self.max_seq_len = config.max_seq_len or self.spec.max_positions
        if self.max_seq_len > self.spec.max_positions:
            raise ConfigError(
                f"MAX_SEQ_LEN={self.max_seq_len} exceeds the backbone's "
                f"max_position_embeddings {self.spec.max_positions}"
            )
        self.registry = TaskRegistry.on_backbone(
            weights.to(device, self.dtype),
            ops=ops_module,
            maskbert_format=config.maskbert_format,
            budget_bytes=config.memory_budget_mb << 20,
        )
        self.encoder = SharedEncoder(self.registry, config.shadow_streams)
        self.stager = Stager(device)
        self.graphs = (
            GraphCache(device, max_graphs=config.graph_cache)
            if device.type == "cuda" and config.cuda_graphs and not config.shadow_streams
            else None
        )
        # one-sequence batches padded to a length bucket: one graph serves nearby lengths
        self.length_buckets = self.graphs is not None
        self._templates: OrderedDict[tuple[Any, ...], _Template] = OrderedDict()
        self._template_bytes = 0  # the kept templates' nbytes, in all
        self._state_version: tuple[int, int] | None = None
        self._state: Hashable = ()
        self.tokenizer = load_tokenizer(checkpoint, self.max_seq_len)
        self.limits = Limits(
            max_len=self.max_seq_len,
            vocab=self.spec.vocab,
            max_text_bytes=config.max_text_bytes,
            max_rows=config.max_rows,
            max_request_text_bytes=config.max_request_text_bytes,
            type_vocab=self.spec.type_vocab,
        )
        self.scheduler, self.cost_source = self._make_scheduler(config, model_dir)
        return checkpoint

    @property
    def ctx(self) -> PetContext:
        """The PET types' shared context (backbone on the device, slot groups, op module)."""
        return self.registry.ctx

    @property
    def heads(self) -> HeadTable:
        return self.registry.heads

    def _make_scheduler(self, config: EngineConfig, model_dir: Path) -> tuple[Scheduler, str]:
        """The configured policy; a policy that costs batches gets the profiled table if
        there is one, else the analytic model of this device. Returns it and the cost
        source for the log."""
        source = ["no cost model"]
        table = Path(config.cost_table)
        table = table if table.is_absolute() else model_dir / table

        def cost_model() -> CostModel:
            if table.is_file():
                source[0] = f"cost table {table}"
                return CostTable.load(table)
            s = self.spec
            source[0] = (
                f"analytic cost model: no table at {table}; run "
                f"`pets profile -o {table}` to measure this device"
            )
            return AnalyticModel.for_device(
                self.device.type, hidden=s.hidden, layers=s.layers, ffn=s.ffn
            )

        ctx = SchedulerContext(config.max_batch_tokens, config.batch_size, cost_model)
        return scheduler_from_context(config.scheduler, ctx), source[0]

    @classmethod
    def from_parameters(
        cls, params: Mapping[str, str], *, model_dir: str | Path = ".", device: str = "cpu"
    ) -> Engine:
        return cls(EngineConfig.from_parameters(params), model_dir=model_dir, device=device)

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join(timeout=5)
        self.registry.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------ serving
    def execute(
        self, requests: Sequence[Mapping[str, np.ndarray]]
    ) -> list[np.ndarray | RequestError]:
        """Serve one Triton batch: one output (``[k, D]`` float32) or error per request."""
        # Every batch first picks up store changes (one stat unless the store changed), so a
        # request sent after a register/update/unregister returned is served with it on every
        # instance; this also waits while the refresh thread is placing tasks.
        self.maybe_refresh()
        outs: list[np.ndarray | RequestError | None] = [None] * len(requests)
        rows: list[Row] = []
        owner: list[int] = []
        decoded = decode_requests(requests, self.tokenizer, self.limits)
        for i, got in enumerate(decoded):
            if isinstance(got, RequestError):
                outs[i] = got
                continue
            rows.extend(got)
            owner.extend([i] * len(got))
        unknown = {r.task for r in rows} - self.registry.tasks.keys()
        if unknown:  # an unknown task is re-checked in the store once before it is refused
            unknown = self._load_missing(unknown)
        for j, r in enumerate(rows):  # a request with an unknown row fails as a whole
            if r.task in unknown and outs[owner[j]] is None:
                outs[owner[j]] = self._unknown(r.task)
        keep = [j for j in range(len(rows)) if outs[owner[j]] is None]
        t0 = time.perf_counter()
        results = self.run(
            [rows[j].ids for j in keep],
            [rows[j].task for j in keep],
            [rows[j].types for j in keep],
        )
        compute_s = time.perf_counter() - t0
        per_req: dict[int, list[np.ndarray]] = {}
        for j, res in zip(keep, results, strict=True):
            if isinstance(res, RequestError):
                outs[owner[j]] = res
            elif outs[owner[j]] is None:
                per_req.setdefault(owner[j], []).append(res)
        for i, parts in per_req.items():
            if outs[i] is not None:
                continue
            if len(parts) == 1:  # the common request: one row, no copy
                outs[i] = parts[0][None]
                continue
            shapes = {p.shape for p in parts}
            outs[i] = (
                np.stack(parts)
                if len(shapes) == 1
                else RequestError(
                    "the rows of one request produce outputs of different widths or token "
                    f"counts (shapes {sorted(shapes)}); send rows of tasks with different "
                    "heads, and token-classification rows of different lengths, as separate "
                    "requests"
                )
            )
        assert all(o is not None for o in outs), "every request gets an answer; this is a bug"
        self._record(outs, rows, owner, keep, compute_s)  # type: ignore[arg-type]
        return outs  # type: ignore[return-value]

    def _record(
        self,
        outs: Sequence[np.ndarray | RequestError],
        rows: Sequence[Row],
        owner: Sequence[int],
        keep: Sequence[int],
        compute_s: float,
    ) -> None:
        """Hand the execute's rows to :attr:`stats` (task labels: registered names only)."""
        if not self.stats.enabled:  # METRICS=0: nothing reads them, gather nothing
            return
        served = [j for j in keep if not isinstance(outs[owner[j]], RequestError)]
        failed = [(i, o) for i, o in enumerate(outs) if isinstance(o, RequestError)]
        errors: list[tuple[str, str]] = []
        if failed:  # label each by its first row's task, where that task is registered
            first: dict[int, str] = {}
            for j, r in enumerate(rows):
                first.setdefault(owner[j], r.task)
            tasks = self.registry.tasks
            errors = [(t if (t := first.get(i, "")) in tasks else "", o.code) for i, o in failed]
        with self.registry.lock:  # the refresh thread may be adding or removing tasks
            resident, nbytes = len(self.registry.tasks), self.registry.memory_bytes()
        self.stats.record(
            [rows[j].task for j in served],
            [len(rows[j].ids) for j in served],
            errors,
            compute_s,
            resident,
            nbytes,
        )

    def run(
        self,
        ids: Sequence[np.ndarray],
        tasks: Sequence[str],
        types: Sequence[np.ndarray | None] | None = None,
    ) -> list[np.ndarray | RequestError]:
        """Run validated sequences; returns one output (or error) per sequence: ``[D]``, or
        ``[L, C]`` for a token-classification task (``L`` the sequence's own length).

        ``types``: per sequence, its token type ids (sentence pairs) or None (all type 0).

        The task names are resolved once, under the registry lock that a writer takes to
        place or remove a task: a task removed while its request waited is refused here.
        """
        if not ids:
            return []
        out: list[np.ndarray | RequestError | None] = [None] * len(ids)
        with self.registry.lock:
            entries = [self.registry.tasks.get(t) for t in tasks]
            live = [j for j, e in enumerate(entries) if e is not None]
            for j, e in enumerate(entries):
                if e is None:
                    out[j] = self._unknown(tasks[j])
            queries = [
                Query(
                    index=k,
                    task_slot=entries[j].slot,  # type: ignore[union-attr]
                    pet_type=entries[j].manifest.pet_type,  # type: ignore[union-attr]
                    length=len(ids[j]),
                )
                for k, j in enumerate(live)
            ]
            for sb in self.scheduler.schedule(queries):
                idx = [live[k] for k in sb.indices]
                try:
                    sb_types = None if types is None else [types[i] for i in idx]
                    sb_ids = [ids[i] for i in idx]
                    pad = sb.padded_length or self._bucket(sb_ids)
                    prepared = self._prepare(sb_ids,
                                             [entries[i].slot for i in idx],  # type: ignore[union-attr]
                                             pad, sb_types)  # fmt: skip
                    values_np = self._compute(prepared).cpu().numpy()
                    hp = prepared.head
                    width = hp.width.numpy()
                    n = len(idx)
                    for row, caller in enumerate(prepared.batch.order):
                        if hp.tok_start is not None and hp.tok_len is not None:
                            start = int(hp.tok_start[row])
                            if start >= 0:  # token head: its own tokens' rows, [L, C]
                                first = n + start
                                stop = first + int(hp.tok_len[row])
                                out[idx[caller]] = values_np[first:stop, : width[row]].copy()
                                continue
                        out[idx[caller]] = values_np[row, : width[row]].copy()
                except Exception as exc:  # one failed batch harms no other batch
                    log.exception("engine batch failed")
                    for i in idx:
                        out[i] = RequestError(f"internal error in the engine: {exc}", "INTERNAL")
        return out  # type: ignore[return-value]

    def warm_graphs(self, max_len: int) -> dict[str, float]:
        """Capture at start-up the forwards of single requests, so that no user waits on it.

        For one task of each (PET type, head kind) loaded, runs one request of each length
        bucket up to ``max_len`` tokens, in the padded layout every request of that bucket
        takes (:func:`pets.graphs.length_bucket`), captured at once and outside the capture
        budget (:meth:`GraphCache.warming`). Tasks of the same type and head kind share these
        graphs when their plans' host scalars agree (e.g. the same LoRA rank and modules);
        other shapes are captured on their second batch as before. A failure is logged and
        leaves the instance serving eagerly for that shape. Returns the graph counts (empty
        when graphs are off).
        """
        graphs = self.graphs
        if graphs is None or max_len <= 0 or not self.length_buckets:
            return {}
        reps: dict[tuple[str, str], str] = {}
        for name in sorted(self.registry.tasks):
            m = self.registry.tasks[name].manifest
            reps.setdefault((m.pet_type, m.head.kind), name)
        # every length of a bucket takes its padded layout: one request per bucket warms it
        lengths = bucket_lengths(min(max_len, self.max_seq_len))
        limit = max(0, graphs.max_graphs - graphs.max_graphs // 4)  # room for mixed batches
        work = [(name, n) for n in lengths for name in reps.values()][:limit]  # short ones first
        t0 = time.perf_counter()
        before = graphs.captures
        token = min(1000, self.spec.vocab - 1)
        try:
            with graphs.warming():  # one forward per shape: its capture
                for name, n in work:
                    self.run([np.full(n, token, dtype=np.int64)], [name])
        except Exception:  # a warm-up must never keep the instance from serving
            log.exception("CUDA graph warm-up failed; shapes are captured as batches arrive")
        got = graphs.summary()
        log.info(
            "CUDA graphs: warmed %d one-request shapes (%d task kinds x lengths up to %d) in "
            "%.1f s, %d captured",
            len(work),
            len(reps),
            lengths[-1] if lengths else 0,
            time.perf_counter() - t0,
            graphs.captures - before,
        )
        return got

    def _bucket(self, ids: Sequence[np.ndarray]) -> int:
        """The length a one-sequence batch is padded to so that it replays a CUDA graph
        (:func:`pets.graphs.length_bucket`; the sequence's own length when it fills its
        bucket), or 0: packed (graphs off, or several sequences)."""
        if not self.length_buckets or len(ids) != 1:
            return 0
        return length_bucket(len(ids[0]), self.max_seq_len)

    def _unknown(self, name: str) -> RequestError:
        reason = self.registry.rejected.get(name)
        if reason is not None:  # visible to the client, not only in the server log
            return RequestError(
                f"task {quote(name)} exists in the store but failed validation: "
                f"{clip(reason, REASON_LIMIT)}"
            )
        return RequestError(
            f"unknown task {quote(name)}; {len(self.registry.tasks)} tasks are loaded "
            "(list them with `pets list`); register it in the task store first"
        )

    def _load_missing(self, names: set[str]) -> set[str]:
        """Load the tasks ``names`` if the store has them now; returns those still unknown."""
        with self._refresh_lock:  # the refresh thread may be loading them right now
            for name in names:
                if name not in self.registry.tasks:
                    self.registry.load_if_present(self.store, name)
        return names - self.registry.tasks.keys()

    def _prepare(
        self,
        ids: Sequence[np.ndarray],
        slots: Sequence[int],
        pad_to: int,
        types: Sequence[np.ndarray | None] | None = None,
    ) -> Prepared:
        """Lay out one engine batch and run the host half of its forward; its device arrays
        are staged and copied in one transfer.

        A batch of the same task slots and lengths as a recent one (the registry unchanged)
        reuses that batch's plans: only its token ids (and token types) are staged anew. A
        padded one-sequence batch reuses the plans of any length in its bucket (its valid
        length is staged anew too), unless its task has a token head, whose rows depend on
        the length.
        """
        stager = self.stager
        if not has_token_types(types):
            types = None  # all type 0: the batch stages no token types (as build_batch)
        any_length = pad_to and len(ids) == 1 and not self.registry.heads.token_head(slots[0])
        lengths = "any length" if any_length else tuple(len(x) for x in ids)
        sig = (tuple(slots), types is not None, pad_to, lengths)
        reuse = stager.enabled  # the CPU stages nothing: nothing to reuse
        at = (self.registry.version, stager.epoch, *sig)
        tpl = self._templates.get(at) if reuse else None
        if tpl is not None:
            self._templates.move_to_end(at)
            order = tpl.prepared.batch.order
            flat = np.concatenate([np.asarray(ids[i], dtype=np.int64) for i in order])
            types_flat = None if types is None else flat_token_types(ids, types, order)
            new = {}
            if pad_to:  # build_batch stages ids, token types if any, then the valid lengths
                valid = np.fromiter((len(ids[i]) for i in order), np.int64, len(order))
                flat = pad_rows(flat, valid, pad_to)
                types_flat = None if types_flat is None else pad_rows(types_flat, valid, pad_to)
                lens = tpl.prepared.batch.valid_lens_cpu
                assert lens is not None  # a padded batch has them
                lens.copy_(torch.from_numpy(valid))  # the batch's host copy stays true
                new[1 + (types_flat is not None)] = lens
            new[0] = torch.from_numpy(flat)  # input_ids: staged first (build_batch)
            if types_flat is not None:  # token types: staged second
                new[1] = torch.from_numpy(types_flat)
            stager.restore(tpl.stage, new)
            stager.flush()
            for view, src in tpl.copies:
                view.copy_(src)
            return tpl.prepared
        for _ in range(2):
            stager.begin()
            batch = self.encoder.batch(ids, slots, pad_to=pad_to, types=types, upload=stager.put)
            prepared = self.encoder.prepare(batch, stager.put)
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            if self.graphs is not None:  # plans' own device arrays move into the stage too
                prepared.active = restage(prepared.active, stager, copies)
            snap = stager.snapshot()
            try:
                stager.flush()
            except StagingOverflow as exc:  # a bigger batch than any before: grow, redo
                stager.grow(exc.need)
                continue
            for view, src in copies:
                view.copy_(src)
            if reuse:
                state = (self.registry.version, stager.epoch)  # the stage may have grown
                if self._templates and next(iter(self._templates))[:2] != state:
                    self._templates.clear()  # tasks or the stage moved: every plan is stale
                    self._template_bytes = 0
                at = (*state, *sig)
                tpl = _Template(prepared, stager.with_image(snap), copies)
                self._templates[at] = tpl  # new: the lookup above missed it
                self._template_bytes += tpl.nbytes
                while len(self._templates) > 1 and (
                    len(self._templates) > _MAX_TEMPLATES
                    or self._template_bytes > _MAX_TEMPLATE_BYTES
                ):
                    _, dropped = self._templates.popitem(last=False)
                    self._template_bytes -= dropped.nbytes
            return prepared
        raise AssertionError("staging still overflows after growing; this is a bug")

    def _compute(self, prepared: Prepared) -> torch.Tensor:
        """The device half: ``[B, D]`` float32, replayed from a CUDA graph where possible."""
        graphs = self.graphs
        if graphs is None:
            return self.encoder.compute(prepared)
        b = prepared.batch

        def key() -> Hashable | None:
            rest = graph_key(
                (
                    b.max_seqlen,
                    b.shared_rows,
                    (
                        b.input_ids,
                        b.positions,
                        b.cu_seqlens,
                        b.seg_indptr,
                        b.valid_lens,
                        b.token_types,
                    ),
                    prepared.active,
                    prepared.sp,
                    prepared.head,
                ),
                self.stager.device_buffer,
            )
            # the staged (dtype, shape) sequence is hashable as it is: walking it cost more
            # than the rest of the key
            return None if rest is None else (tuple(self.stager.layout), rest)

        if prepared.graph_key is None:  # computed once per prepared batch (reused batches too)
            prepared.graph_key = (key(),)
        return graphs.run(
            prepared.graph_key[0], self._state_key(), lambda: self.encoder.compute(prepared), key
        )

    def _state_key(self) -> Hashable:
        """Addresses of every persistent tensor a forward reads: the task pools and tables,
        and the stage's device buffer (recomputed only after the registry or the stage
        changed). A graph captured before the stage grew would read the old buffer."""
        version = (self.registry.version, self.stager.epoch)
        if version != self._state_version:
            self._state_version = version
            tensors = [*self.registry.device_tensors(), self.stager.device_buffer]
            self._state = state_key(tensors)
        return self._state

    # ------------------------------------------------------------------------------ tasks
    def _store_generation(self) -> int:
        try:
            return os.stat(self._generation_file).st_mtime_ns
        except FileNotFoundError:
            return 0

    def maybe_refresh(self, force: bool = False) -> None:
        """Pick up task-store changes (cheap: one ``stat`` unless the store changed)."""
        with self._refresh_lock:
            gen = self._store_generation()
            if force or gen != self._generation:
                self._generation = gen
                report = self.registry.refresh(self.store)
                if any(report.values()):
                    log.info("task store refresh: %s", {k: v for k, v in report.items() if v})


def _refresh_loop(ref: weakref.ref[Engine], stop: threading.Event, period_ms: int) -> None:
    """Poll the store every ``period_ms`` so an idle instance sees changes within a second.

    Holds only a weak reference between polls: an engine dropped without ``close`` ends it.
    Loading happens outside the registry lock; placing a task takes the lock, which a forward
    holds for its whole duration, so a forward in flight is never disturbed.
    """
    eng = ref()
    if eng is not None and eng.device.type == "cuda":
        torch.cuda.set_device(eng.device)  # the current device is per thread
    del eng
    while not stop.wait(period_ms / 1000):
        eng = ref()
        if eng is None:
            return
        try:
            eng.maybe_refresh()
        except Exception:  # a bad store state must not end the polling
            log.exception("task store refresh failed; retrying in %d ms", period_ms)
        del eng
