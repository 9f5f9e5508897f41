"""Device memory one registered task takes, per PET type and form.

Registers one random task of each asked type (``TYPE`` or ``TYPE:key=value,...`` with the
type's generator options, e.g. ``maskbert:density=0.01``) on a backbone and reports the bytes
its pools and head take (the registry's own count, as in its ``task ... MiB`` debug line),
with the form the type chose (MaskBERT: ``index`` or ``bitmask``). Prints a table and writes
``task_memory.csv`` to a dated run folder under ``--out`` (``clients/bench/results.py``).

    python -m clients.bench.task_memory --backbone bert-base --dtype float16
    python -m clients.bench.task_memory --types diff_pruning,maskbert:density=0.01
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from clients.bench.results import add_out_argument, start_run
from pets.backbone import load_backbone, resolve_checkpoint
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import write_task

DEFAULT_TYPES = ("maskbert:density=0.01", "maskbert:density=0.05")


def parse_type(text: str) -> tuple[str, dict[str, Any]]:
    """``"maskbert:density=0.01"`` -> ``("maskbert", {"density": 0.01})``."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--types entry {text!r}: options are key=value, got {item!r}")
        options[key] = float(value) if "." in value or "e" in value else int(value)
    if name not in pet_types():
        raise SystemExit(f"--types entry {text!r}: unknown PET type; one of {sorted(pet_types())}")
    return name, options


def measure(backbone: str, dtype: str, device: str, specs: list[str]) -> list[dict[str, Any]]:
    """One row per spec: its label, type, form and registered bytes (and MiB)."""
    weights = load_backbone(resolve_checkpoint(backbone))
    store = Path(tempfile.mkdtemp(prefix="pets-task-memory-"))
    head = HeadConfig("embedding", pooling="mean")
    names = {}
    for k, spec in enumerate(specs):
        pet, options = parse_type(spec)
        names[f"task{k}"] = spec
        write_task(store, *random_task(weights, f"task{k}", pet, head, k, options))
    params = {"BACKBONE": backbone, "TASK_STORE": str(store), "DTYPE": dtype, "REFRESH_MS": "0"}
    engine = Engine.from_parameters(params, device=device)
    rows = []
    for name, spec in names.items():
        entry = engine.registry.tasks[name]
        rows.append(
            {
                "task": spec,
                "pet_type": entry.manifest.pet_type,
                "form": entry.loaded.form or "",
                "bytes": entry.nbytes,
                "mib": round(entry.nbytes / (1 << 20), 3),
                "backbone": backbone,
                "dtype": str(engine.dtype).removeprefix("torch."),
                "device": str(engine.device),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="bert-base")
    p.add_argument("--dtype", default="auto", help="auto = float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--types",
        default=None,
        help="comma list of TYPE or TYPE:key=value (default: every type, MaskBERT at 1%% and 5%%)",
    )
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.types:
        specs = _split_types(args.types)
    else:
        specs = [t for t in sorted(pet_types()) if t not in ("none", "maskbert")]
        specs += list(DEFAULT_TYPES)
    out = start_run("task_memory", args.out, params=vars(args))
    rows = measure(args.backbone, args.dtype, args.device, specs)
    out.write_csv("task_memory.csv", rows)
    for r in rows:
        form = f" as {r['form']}" if r["form"] else ""
        print(f"{r['task']:<28} {r['pet_type']}{form}: {r['mib']:.2f} MiB ({r['dtype']})")
    out.finish()
    return 0


def _split_types(text: str) -> list[str]:
    """Split ``a,b:x=1,y=2,c`` at the commas that start a new type (not an option's)."""
    parts: list[str] = []
    for item in text.split(","):
        if parts and "=" in item and ":" not in item:
            parts[-1] += "," + item
        else:
            parts.append(item)
    return parts


if __name__ == "__main__":
    sys.exit(main())
