"""The task registry: names -> task slots, loading from the store and refreshing from it.

Every task gets an engine-wide *slot*; the PET types, the heads and the epilogue slot groups
key their per-task state by it. A task is validated completely before anything is placed,
so a bad task is reported and skipped and the registry is unchanged.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from petops import reference

from .backbone import LN_SITES, SITES, BackboneWeights
from .errors import TaskError, short
from .heads import HeadTable, validate_head
from .pet import LoadedTask, PetContext, PetMethod, pet_types
from .pet.base import check_known
from .pet.meta import SlotMeta
from .tables import FlatPool, SlotGroup
from .taskstore import (
    TaskManifest,
    check_name,
    entry_mtime,
    list_tasks,
    read_task,
    store_state,
)

log = logging.getLogger("pets")


@dataclass
class TaskEntry:
    manifest: TaskManifest
    slot: int
    loaded: LoadedTask
    nbytes: int
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.manifest.name


@dataclass(frozen=True)
class SegmentRows:
    """Per-segment rows of one batch, host ``[S]`` each (see :class:`SlotTable`)."""

    pet: torch.Tensor  # int8 PET type code of each segment's task
    bias: torch.Tensor  # int32 row of the bias slot group
    ln: torch.Tensor  # int32 row of the LayerNorm slot group
    scale: torch.Tensor  # int32 row of the IA3 scale slot group (0: the backbone's ones)


class SlotTable:
    """What every forward reads per task slot: the task's PET type and its rows in the
    engine's bias, LayerNorm and IA3-scale slot groups. The registry fills it; the encoder
    reads it per batch through :meth:`segments`, and the batch builder through
    :meth:`owns_linear`. Host tensors; unset slots read 0."""

    def __init__(self) -> None:
        self._pet = SlotMeta((), torch.int8, 0)
        self._bias = SlotMeta((), torch.int32, 0)
        self._ln = SlotMeta((), torch.int32, 0)
        self._scale = SlotMeta((), torch.int32, 0)
        self._own = SlotMeta((), torch.bool, False)

    def set(self, slot: int, pet_code: int, loaded: LoadedTask) -> None:
        self._pet[slot] = pet_code
        self._bias[slot] = loaded.bias_slot
        self._ln[slot] = loaded.ln_slot
        self._scale[slot] = loaded.scale_slot
        self._own[slot] = loaded.owns_linear

    def reset(self, slot: int) -> None:
        for meta in (self._pet, self._bias, self._ln, self._scale, self._own):
            meta.reset(slot)

    def segments(self, seg_task: torch.Tensor) -> SegmentRows:
        """The rows of the tasks ``seg_task`` (host int64 ``[S]``)."""
        return SegmentRows(
            self._pet[seg_task], self._bias[seg_task], self._ln[seg_task], self._scale[seg_task]
        )

    def owns_linear(self, slots: np.ndarray) -> np.ndarray:
        """bool ``[n]``: which of the task ``slots`` compute their linear layers in full
        (``build_batch(owns_linear=...)`` puts their sequences last)."""
        return self._own.rows(slots)


class TaskRegistry:
    """Owns the PET methods, the heads and the per-slot rows (:class:`SlotTable`)."""

    @classmethod
    def on_backbone(
        cls,
        weights: BackboneWeights,
        *,
        ops: ModuleType = reference,
        maskbert_format: str = "auto",
        budget_bytes: int = 0,
    ) -> TaskRegistry:
        """An empty registry over ``weights`` (already on the serving device and dtype): the
        slot groups start with the backbone's own biases, LayerNorms and unit IA3 scales.

        Args:
            ops: the op module the PET types call (``pets.kernels.select``).
            maskbert_format: MASKBERT_FORMAT (pet/maskbert.py).
            budget_bytes: task memory budget (MEMORY_BUDGET_MB); 0 = unlimited.
        """
        spec = weights.spec
        device, dtype = weights.word.device, weights.word.dtype
        bias = SlotGroup({s: torch.stack(weights.bias[s]) for s in SITES}, device, dtype)
        ln_rows = {}
        for site in ("emb_ln", *LN_SITES):
            ln_rows[f"{site}.gamma"] = torch.stack(weights.ln_gamma[site])
            ln_rows[f"{site}.beta"] = torch.stack(weights.ln_beta[site])
        ln = SlotGroup(ln_rows, device, dtype)
        ones = {
            "qkv": torch.ones(spec.layers, 3 * spec.hidden),
            "ffn_in": torch.ones(spec.layers, spec.ffn),
        }
        scale = SlotGroup(ones, device, dtype)
        ctx = PetContext(
            spec, device, dtype, weights, bias, ln, scale, ops, maskbert_format=maskbert_format
        )
        heads = HeadTable(spec, device, dtype, weights.pooler_w, weights.pooler_b)
        registry = cls(ctx, heads)
        registry.budget_bytes = budget_bytes
        return registry

    def __init__(self, ctx: PetContext, heads: HeadTable) -> None:
        self.ctx = ctx
        self.heads = heads
        self.methods: dict[str, PetMethod] = {name: cls(ctx) for name, cls in pet_types().items()}
        self.by_code = {m.code: m for m in self.methods.values()}
        self.tasks: dict[str, TaskEntry] = {}
        # store entries whose latest version failed to load: name -> reason (store paths as
        # "<store>"); a rejected update leaves the older version in ``tasks``
        self.rejected: dict[str, str] = {}
        self._rejected_mtime: dict[str, int] = {}  # the entry's stamp when it was refused
        self._task_bytes = 0  # sum of the resident tasks' nbytes, kept with `tasks`
        self._free_slots: list[int] = []
        self._next_slot = 0
        self.slots = SlotTable()
        self.lock = threading.RLock()  # held by writers and by a forward
        self.version = 0  # bumped by every add (even a failed one) and removal
        self.budget_bytes = 0  # task memory budget (MEMORY_BUDGET_MB); 0 = unlimited

    # ----------------------------------------------------------------------------- lifecycle
    def validate(self, manifest: TaskManifest, tensors: dict[str, torch.Tensor]) -> PetMethod:
        """Full validation; raises :class:`TaskError` naming the problem."""
        if manifest.pet_type not in self.methods:
            raise TaskError(
                f"task {manifest.name!r}: unknown PET type {short(manifest.pet_type)}; "
                f"known types are {sorted(self.methods)}"
            )
        if manifest.backbone_fingerprint != self.ctx.spec.fingerprint:
            raise TaskError(
                f"task {manifest.name!r} was made for backbone "
                f"{short(manifest.backbone_fingerprint)[1:-1]}, but this server runs "
                f"{self.ctx.spec.fingerprint}; re-create it for this backbone"
            )
        method = self.methods[manifest.pet_type]
        head_t = {k: v for k, v in tensors.items() if k.startswith(("classifier.", "pooler."))}
        pet_t = {k: v for k, v in tensors.items() if k not in head_t}
        check_known(
            head_t,
            {"classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"},
            manifest.pet_type,
        )
        validate_head(manifest.head, self.ctx.spec, head_t)
        try:
            method.validate(manifest.hparams, pet_t)
        except TaskError as exc:
            raise TaskError(f"task {manifest.name!r}: {exc}") from None
        return method

    def add(
        self, manifest: TaskManifest, tensors: dict[str, torch.Tensor], mtime_ns: int = 0
    ) -> TaskEntry:
        """Validate and place a task; replaces a task of the same name."""
        method = self.validate(manifest, tensors)
        head_t = {k: v for k, v in tensors.items() if k.startswith(("classifier.", "pooler."))}
        pet_t = {k: v for k, v in tensors.items() if k not in head_t}
        with self.lock:
            # Loading may grow (move) a pool or head table even if it fails part-way: every
            # cache of their addresses (CUDA graphs, reused plans) is stale from here on.
            self.version += 1
            slot = self._free_slots.pop() if self._free_slots else self._take_slot()
            try:
                loaded = method.load(slot, manifest.hparams, pet_t)
                loaded.allocations.extend(self.heads.add(slot, manifest.head, head_t))
            except Exception:
                # Out of device memory part-way, say: the task never becomes visible and its
                # slot is reused (pool space it took before failing stays with the pools).
                self.heads.remove(slot)
                self._free_slots.append(slot)
                raise
            old = self.tasks.get(manifest.name)
            self.slots.set(slot, method.code, loaded)
            nbytes = loaded.nbytes(self.ctx) + self.heads.row_bytes()
            entry = TaskEntry(manifest, slot, loaded, nbytes, mtime_ns)
            self._check_budget(entry, old)
            self.tasks[manifest.name] = entry
            self._task_bytes += nbytes - (old.nbytes if old is not None else 0)
            if old is not None:
                self._release(old)
        log.debug(
            "task %r in slot %d: %s%s, %.2f MiB",
            manifest.name,
            slot,
            method.name,
            f" as {loaded.form}" if loaded.form else "",
            nbytes / (1 << 20),
        )
        return entry

    def _check_budget(self, entry: TaskEntry, old: TaskEntry | None) -> None:
        """Undo ``entry``'s placement and refuse it if it would overrun the memory budget."""
        if not self.budget_bytes:
            return
        used = self.memory_bytes() - (old.nbytes if old is not None else 0)
        if used + entry.nbytes <= self.budget_bytes:
            return
        self._release(entry)
        mib, left = 1 << 20, self.budget_bytes - used
        raise TaskError(
            f"task {entry.name!r} needs {entry.nbytes / mib:.2f} MiB of device memory, but "
            f"MEMORY_BUDGET_MB={self.budget_bytes // mib} has {left / mib:.2f} MiB left "
            f"({used / mib:.2f} MiB used by {len(self.tasks)} tasks); raise "
            "MEMORY_BUDGET_MB (size it with `pets capacity`), remove tasks, or serve this task "
            "from another model instance"
        )

    def remove(self, name: str) -> None:
        with self.lock:
            entry = self.tasks.pop(name, None)
            if entry is None:
                raise TaskError(f"no task {name!r} is loaded; loaded tasks: {len(self.tasks)}")
            self._task_bytes -= entry.nbytes
            self._release(entry)

    def _release(self, entry: TaskEntry) -> None:
        self.version += 1
        self.methods[entry.manifest.pet_type].unload(entry.slot, entry.loaded)
        self.heads.remove(entry.slot)
        self.slots.reset(entry.slot)
        self._free_slots.append(entry.slot)

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    # ----------------------------------------------------------------------------- store sync
    def load_store(self, store: Path) -> list[str]:
        """Load every task of ``store``; returns the error messages of skipped tasks."""
        errors = []
        for name in list_tasks(store):
            err = self._load_one(store, name)
            if err:
                errors.append(err)
        return errors

    def refresh(self, store: Path) -> dict[str, list[str]]:
        """Bring the registry in line with the store: add new, reload changed, drop removed."""
        state = store_state(store)
        report: dict[str, list[str]] = {"added": [], "updated": [], "removed": [], "errors": []}
        for name, mtime in state.items():
            cur = self.tasks.get(name)
            if cur is not None and cur.mtime_ns == mtime:
                continue
            err = self._load_one(store, name, mtime)
            if err:
                report["errors"].append(err)
            else:
                report["updated" if cur else "added"].append(name)
        for name in [n for n in self.tasks if n not in state]:
            self.remove(name)
            report["removed"].append(name)
        for name in [n for n in self.rejected if n not in state]:
            self.rejected.pop(name, None)
            self._rejected_mtime.pop(name, None)
        return report

    def load_if_present(self, store: Path, name: str) -> bool:
        """Load task ``name`` if the store has it (the re-check before refusing a task)."""
        try:
            check_name(name)
        except TaskError:
            return False
        try:
            mtime = entry_mtime(store, name)
        except OSError:
            return False
        if self._rejected_mtime.get(name) == mtime:  # refused as it is: not read again
            return False
        return self._load_one(store, name, mtime) is None

    def _load_one(self, store: Path, name: str, mtime_ns: int | None = None) -> str | None:
        folder = store / name
        try:
            if mtime_ns is None:
                mtime_ns = entry_mtime(store, name)
            manifest, tensors = read_task(folder)
            self.add(manifest, tensors, mtime_ns)
        except (TaskError, OSError) as exc:
            msg = f"skipped task {name!r}: {exc}"
            log.error(msg)
            self.rejected[name] = str(exc).replace(str(store), "<store>")
            if mtime_ns is not None:
                self._rejected_mtime[name] = mtime_ns
            return msg
        self.rejected.pop(name, None)
        self._rejected_mtime.pop(name, None)
        return None

    # ----------------------------------------------------------------------------- queries
    def slot_of(self, name: str) -> int | None:
        entry = self.tasks.get(name)
        return None if entry is None else entry.slot

    def device_tensors(self) -> list[torch.Tensor]:
        """Every persistent tensor a forward may read: slot-group tables, head tables and
        each PET type's pools (a CUDA graph is valid while none of them moved)."""
        out = [t for g in (self.ctx.bias, self.ctx.ln, self.ctx.scale) for t in g.tables.values()]
        heads = self.heads
        out += [heads.cls_w, heads.cls_b, heads.own_pooler.data, heads.pooler_w, heads.pooler_b]
        for method in self.methods.values():
            for value in vars(method).values():
                if isinstance(value, FlatPool):
                    out.append(value.data)
                elif isinstance(value, SlotGroup):
                    out.extend(value.tables.values())
                elif isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    out.append(value)
        return out

    def memory_bytes(self) -> int:
        """Device bytes of the resident tasks (O(1): read on every execute for the gauges)."""
        return self._task_bytes

    def clear(self) -> None:
        """Forget every task (engine shutdown; the pools go with the engine)."""
        with self.lock:
            self.tasks.clear()
            self._task_bytes = 0
