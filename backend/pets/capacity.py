"""How many tasks of each PET type fit on a device: measured, not estimated.

For each PET type a few random tasks (``taskgen`` defaults, or given hyper-parameters; a
2-label classification head) are registered in a scratch registry on the target device and
dtype. Per task we report the registry's accounting (``TaskEntry.nbytes``: pool allocations,
slot-group rows, head row; this is what ``MEMORY_BUDGET_MB`` is checked against) and, on
CUDA, the allocator delta per task (pools grow by doubling, so it is lumpier). Free memory
is ``torch.cuda.mem_get_info`` after the backbone is on the device (CUDA), the host's
``MemAvailable`` (CPU), or ``--budget-gb``; ``fits = (free - reserve) // task_bytes``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .backbone import BackboneWeights
from .heads import HeadConfig
from .pet import get_pet_type, pet_types
from .tables import FlatPool
from .taskgen import random_task
from .validate import scratch_registry

MIB = 1 << 20


@dataclass
class CapacityRow:
    pet: str
    hparams: dict[str, Any]
    task_bytes: int  # registry accounting per task (TaskEntry.nbytes)
    stored_bytes: int  # the task's tensors as stored (safetensors payload, fp32)
    alloc_bytes: int | None  # CUDA allocator delta per task, None off CUDA
    fits: int
    released: bool  # memory_bytes() and pool use went back to their start after removal
    form: str = ""  # how the type held the samples where it has a choice (MaskBERT: index, bitmask)


@dataclass
class CapacityReport:
    device: str
    dtype: str
    backbone: str
    backbone_bytes: int
    free_bytes: int
    free_source: str
    reserve_bytes: int
    rows: list[CapacityRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"device {self.device} ({self.dtype}), backbone {self.backbone} "
            f"({self.backbone_bytes / MIB:.1f} MiB), free {self.free_bytes / MIB:.0f} MiB "
            f"[{self.free_source}], reserve {self.reserve_bytes / MIB:.0f} MiB",
            f"{'pet':<14}{'form':<9}{'task MiB':>10}{'stored MiB':>12}{'alloc MiB':>11}"
            f"{'fits':>10}{'released':>10}  hparams",
        ]
        for r in self.rows:
            alloc = "-" if r.alloc_bytes is None else f"{r.alloc_bytes / MIB:.3f}"
            lines.append(
                f"{r.pet:<14}{r.form or '-':<9}{r.task_bytes / MIB:>10.3f}"
                f"{r.stored_bytes / MIB:>12.3f}"
                f"{alloc:>11}{r.fits:>10}{r.released!s:>10}  "
                f"{json.dumps(r.hparams)}"
            )
        return "\n".join(lines)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pool_use(reg: Any) -> list[int]:
    """``used`` counts of every slot group and flat pool the registry reaches (leak checks)."""
    out = [reg.ctx.bias.used, reg.ctx.ln.used, reg.ctx.scale.used, reg.heads.own_pooler.used]
    for method in reg.methods.values():
        for value in vars(method).values():
            inner = [value, *vars(value).values()] if hasattr(value, "__dict__") else [value]
            out.extend(p.used for p in inner if isinstance(p, FlatPool))
    return out


def measure(
    weights: BackboneWeights,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    budget_bytes: int | None = None,
    reserve_bytes: int = 0,
    pets: list[str] | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    samples: int = 4,
) -> CapacityReport:
    """Register ``samples`` random tasks per PET type on ``device`` and report the fit."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    reg = scratch_registry(weights, device, dtype)
    if cuda:
        torch.cuda.synchronize(device)
        backbone_bytes = torch.cuda.memory_allocated(device) - before
    else:
        w = reg.ctx.backbone
        backbone_bytes = sum(
            t.numel() * t.element_size()
            for t in [w.word, w.position, w.token_type, *(x for v in w.linear.values() for x in v)]
        )
    if budget_bytes is not None:
        free, source = budget_bytes, "budget"
    elif cuda:
        free, source = torch.cuda.mem_get_info(device)[0], "cuda mem_get_info"
    else:
        free, source = _host_available(), "host MemAvailable"
    report = CapacityReport(
        str(device),
        str(dtype).removeprefix("torch."),
        weights.spec.fingerprint,
        backbone_bytes,
        free,
        source,
        reserve_bytes,
    )
    head = HeadConfig("classification", num_labels=2)
    for pet in pets or sorted(pet_types()):
        hp = dict(get_pet_type(pet).default_options)
        hp.update((hparams or {}).get(pet, {}))
        start_use, start_mem = pool_use(reg), reg.memory_bytes()
        names, sizes, forms, stored = [], [], set(), 0
        if cuda:
            torch.cuda.synchronize(device)
            a0 = torch.cuda.memory_allocated(device)
        for i in range(samples):
            m, t = random_task(weights, f"cap_{pet}_{i}", pet, head, seed=i, hparams=hp)
            stored = sum(v.numel() * v.element_size() for v in t.values())
            entry = reg.add(m, t)
            sizes.append(entry.nbytes)
            forms.add(entry.loaded.form)
            names.append(m.name)
        alloc = None
        if cuda:
            torch.cuda.synchronize(device)
            alloc = (torch.cuda.memory_allocated(device) - a0) // samples
        for n in names:
            reg.remove(n)
        released = reg.memory_bytes() == start_mem and pool_use(reg) == start_use
        task_bytes = max(sizes)
        fits = max(0, (free - reserve_bytes) // task_bytes) if task_bytes else 0
        form = ",".join(sorted(f for f in forms if f))
        report.rows.append(
            CapacityRow(pet, hp, task_bytes, stored, alloc, int(fits), released, form)
        )
    return report
