"""Policy registry: ``make_scheduler(name, **options)`` for tools and tests,
``scheduler_from_context(name, ctx)`` for the engine."""

from __future__ import annotations

from typing import Any

from pets.errors import ConfigError
from pets.scheduling.base import Scheduler, SchedulerContext
from pets.scheduling.policies import (
    AlphaOnlyScheduler,
    BetaOnlyScheduler,
    CoordinatedScheduler,
    FixedScheduler,
    TaskGroupedScheduler,
    TokenBudgetScheduler,
)

DEFAULT_POLICY = "task_grouped"
"""Policy used when the model configuration names none (to be decided by measurements)."""

_REGISTRY: dict[str, type[Scheduler]] = {}


def register(cls: type[Scheduler]) -> type[Scheduler]:
    """Register a policy class under ``cls.name`` (usable as a decorator)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"scheduler name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (
    FixedScheduler,
    BetaOnlyScheduler,
    AlphaOnlyScheduler,
    CoordinatedScheduler,
    TokenBudgetScheduler,
    TaskGroupedScheduler,
):
    register(_cls)


def available_policies() -> tuple[str, ...]:
    """Registered policy names, sorted."""
    return tuple(sorted(_REGISTRY))


def _policy(name: str) -> type[Scheduler]:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown scheduler {name!r}; valid schedulers: {', '.join(available_policies())}. "
            f"Set the 'scheduler' parameter in config.pbtxt to one of them "
            f"(default {DEFAULT_POLICY!r})"
        )
    return cls


def scheduler_from_context(name: str, ctx: SchedulerContext) -> Scheduler:
    """The policy ``name`` configured from the engine's settings (unknown names: ConfigError)."""
    return _policy(name).from_context(ctx)


def make_scheduler(name: str, **options: Any) -> Scheduler:
    """Build the policy ``name`` with ``options``; unknown names/options raise ConfigError."""
    cls = _policy(name)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ConfigError(
            f"scheduler {name!r} does not take option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(cls.options) or '(none)'}. Remove or rename them in config.pbtxt"
        )
    return cls(**options)
