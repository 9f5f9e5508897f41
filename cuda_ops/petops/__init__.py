"""petops: the PET serving op library (compiled CPU/CUDA kernels with a pure-PyTorch fallback).

The compiled library ``build/out/libpetops.so`` of this source tree (built by
``build/build_ops.sh``) registers the ``torch.ops.petops.*`` operators; importing this package
loads it when it is there. :mod:`petops.ops` has the typed entry points, which fall back to
:mod:`petops.reference` when the library is missing or has no kernel for the tensors' device.
Which of the two an engine calls is the engine's ``OPS`` parameter (``pets.kernels``), not a
setting of this package.
"""

from __future__ import annotations

from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]
LIBRARY = _REPO_ROOT / "build" / "out" / "libpetops.so"

_loaded = False
_load_error: str | None = None
_devices: dict[str, tuple[str, ...]] = {}


def _load() -> None:
    global _loaded, _load_error
    if not LIBRARY.is_file():
        _load_error = f"{LIBRARY} not found; build it with `bash build/build_ops.sh`"
        return
    try:
        torch.ops.load_library(str(LIBRARY))
    except (OSError, RuntimeError) as exc:  # ABI mismatch, missing CUDA runtime, ...
        _load_error = f"failed to load {LIBRARY}: {exc}"
        return
    _loaded = True


def compiled_available() -> bool:
    """Whether ``torch.ops.petops`` kernels were loaded from the compiled library."""
    return _loaded


def compiled_devices(op: str | None = None) -> tuple[str, ...]:
    """Device types with compiled kernels for ``op``, or for every op when ``op`` is None,
    e.g. ``("cpu", "cuda")``. A library built from an older tree may lack newer ops: those
    fall back to the reference alone."""
    if op is None:
        from .ops import OP_NAMES

        per_op = [set(compiled_devices(name)) for name in OP_NAMES]
        return tuple(d for d in ("cpu", "cuda") if all(d in devs for devs in per_op))
    if op not in _devices:  # fixed once loaded; cached because ops.py asks on every call
        keys = {"cpu": "CPU", "cuda": "CUDA"}
        _devices[op] = tuple(
            dev
            for dev, key in keys.items()
            if compiled_available()
            and hasattr(torch.ops.petops, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"petops::{op}", key)
        )
    return _devices[op]


def backend_name() -> str:
    """Human-readable backend, e.g. ``"compiled[cpu,cuda]"`` or ``"reference (<why>)"``."""
    if compiled_available():
        return f"compiled[{','.join(compiled_devices())}]"
    return f"reference ({_load_error})"


_load()

from . import ops, reference  # noqa: E402  (ops registers fake kernels for the loaded library)

__all__ = [
    "LIBRARY",
    "backend_name",
    "compiled_available",
    "compiled_devices",
    "ops",
    "reference",
]
