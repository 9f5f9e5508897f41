"""Served outputs on an accelerator vs the CPU fp32 reference engine, per PET type.

Both engines load the same random tasks on the same backbone; the CPU one runs the pure
PyTorch reference ops in fp32 (itself checked against HF/PEFT oracles in tests/). The device
runs every type twice: all types in one mixed batch, and each type alone (single-type batches
take paths mixed ones cannot, such as the FFN GELU in the GEMM's epilogue). Prints a JSON line
per PET type with the worse max-abs error and cosine similarity of the two, and how far the PET
moves the output (so a pass cannot be vacuous), and exits non-zero past the tolerance.
Every registered PET type (:func:`pets.pet.pet_types`, "none" included) is checked. The lines
are also written as ``parity.jsonl`` to a dated run folder under ``--out``
(``clients/bench/results.py``).

    python -m clients.bench.check_device_parity --backbone bert-base --device cuda:0 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from clients.bench.results import add_out_argument, start_run
from pets.backbone import load_backbone, resolve_checkpoint
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import write_task

# "none" (the backbone alone) first: the others' effect is measured against it.
TYPES = ("none", *sorted(t for t in pet_types() if t != "none"))
MIN_COSINE = {"float32": 0.99999, "float16": 0.999, "bfloat16": 0.99}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="bert-base-6l")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--seqs", type=int, default=16)
    add_out_argument(p)
    args = p.parse_args()
    out = start_run("check_device_parity", args.out, params=vars(args))
    lines: list[str] = []

    store = Path(tempfile.mkdtemp(prefix="pets-parity-"))
    w = load_backbone(resolve_checkpoint(args.backbone))
    for i, t in enumerate(TYPES):
        m, tensors = random_task(w, f"t_{t}", t, HeadConfig("embedding", pooling="mean"), seed=i)
        write_task(store, m, tensors)
    params = {"BACKBONE": args.backbone, "TASK_STORE": str(store)}
    ref = Engine.from_parameters({**params, "OPS": "reference", "DTYPE": "float32"}, device="cpu")
    dev = Engine.from_parameters({**params, "DTYPE": args.dtype}, device=args.device)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1000, w.spec.vocab, size=int(n)) for n in rng.integers(4, 128, args.seqs)]
    names = [f"t_{t}" for t in TYPES]
    # Every type in one mixed batch and alone on the device; alone on the CPU reference.
    mixed = dev.run([s for _ in names for s in seqs], [n for n in names for _ in seqs])
    base = ref.run(seqs, ["t_none"] * len(seqs))
    ok = True
    for k, name in enumerate(names):
        want = ref.run(seqs, [name] * len(seqs))
        got = mixed[k * len(seqs) : (k + 1) * len(seqs)] + dev.run(seqs, [name] * len(seqs))
        pairs = list(zip(got, want + want, strict=True))
        err = max(float(np.abs(g - r).max()) for g, r in pairs)
        cos = min(float(np.dot(g, r) / (np.linalg.norm(g) * np.linalg.norm(r))) for g, r in pairs)
        moved = max(float(np.abs(r - b).max()) for r, b in zip(want, base, strict=True))
        passed = cos >= MIN_COSINE[args.dtype] and (name == "t_none" or moved > 10 * err)
        ok &= passed
        lines.append(
            json.dumps(
                {
                    "pet": name[2:],
                    "device": torch.cuda.get_device_name(dev.device)
                    if dev.device.type == "cuda"
                    else "cpu",
                    "dtype": args.dtype,
                    "backbone": args.backbone,
                    "ops": dev.ops,
                    "max_abs_err": err,
                    "min_cosine": cos,
                    "pet_effect_max_abs": moved,
                    "pass": passed,
                }
            )
        )
        print(lines[-1], flush=True)
    out.write_text("parity.jsonl", "\n".join(lines) + "\n")
    out.finish("ok" if ok else "failed: parity")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
