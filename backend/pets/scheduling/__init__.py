"""Batch scheduling: policies that turn queries into engine batches, and their cost model.

Entry points: :func:`make_scheduler` (policies by name, :data:`DEFAULT_POLICY`),
:class:`CostTable` / :class:`AnalyticModel` (cost in seconds), :func:`profile`
(build a table from measurements) and :func:`run_offline` (timed offline runs).
"""

from __future__ import annotations

from pets.scheduling.analytic import AnalyticModel
from pets.scheduling.base import (
    PET_TYPES,
    Query,
    ScheduledBatch,
    Scheduler,
    SchedulerContext,
    group_by_task,
    make_batch,
    validate_schedule,
)
from pets.scheduling.cost_model import (
    CostModel,
    CostTable,
    batch_cost,
    compatibility_warnings,
    load_cost_model,
)
from pets.scheduling.offline import run_offline
from pets.scheduling.profiler import ProfileGrid, add_profile_arguments, profile, profile_cli
from pets.scheduling.registry import (
    DEFAULT_POLICY,
    available_policies,
    make_scheduler,
    register,
    scheduler_from_context,
)

__all__ = [
    "DEFAULT_POLICY",
    "PET_TYPES",
    "AnalyticModel",
    "CostModel",
    "CostTable",
    "ProfileGrid",
    "Query",
    "ScheduledBatch",
    "Scheduler",
    "SchedulerContext",
    "add_profile_arguments",
    "available_policies",
    "batch_cost",
    "compatibility_warnings",
    "group_by_task",
    "load_cost_model",
    "make_batch",
    "make_scheduler",
    "profile",
    "profile_cli",
    "register",
    "run_offline",
    "scheduler_from_context",
    "validate_schedule",
]
