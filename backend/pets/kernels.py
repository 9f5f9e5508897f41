"""Which shadow-op implementation an engine calls.

``petops.ops`` dispatches to the compiled library when it is built (and has a kernel for the
tensors' device) and to the pure-PyTorch references otherwise; ``petops.reference`` is the
references alone. The choice is per engine (held in ``PetContext.ops``), so two engines in
one process — a GPU one and a CPU reference, say — never interfere.
"""

from __future__ import annotations

from types import ModuleType

from petops import compiled_available, ops, reference

from .errors import ConfigError

MODES = ("auto", "compiled", "reference")


def select(mode: str) -> tuple[ModuleType, str]:
    """The op module for ``OPS=mode`` (``auto`` | ``compiled`` | ``reference``).

    Returns:
        The module and a description for the engine's log.
    """
    if mode not in MODES:
        raise ConfigError(f"OPS={mode!r}; expected one of {MODES}")
    if mode == "reference":
        return reference, "reference (pure PyTorch)"
    if mode == "compiled" and not compiled_available():
        raise ConfigError(
            "OPS=compiled but the petops library is not built; run "
            "`bash build/build_ops.sh` (or `make ops`), or set OPS=auto"
        )
    return ops, f"petops ({ops.backend_description()})"
