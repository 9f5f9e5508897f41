"""Hypothesis settings for the fuzz suite: derandomized (the same examples on every run, so
CI is reproducible), no example database, no per-example deadline, and a fixed budget of
examples per test (``PETS_FUZZ_EXAMPLES`` scales it for a longer local run, e.g. 20)."""

from __future__ import annotations

import os

import pytest

# the dev extras install it (CI); an offline GPU host without it skips the fuzz suite
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis (dev extras) is not installed")
HealthCheck, settings = hypothesis.HealthCheck, hypothesis.settings

SCALE = float(os.environ.get("PETS_FUZZ_EXAMPLES", "1"))

settings.register_profile(
    "pets-ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("pets-ci")


def budget(n: int) -> int:
    """``n`` examples, times PETS_FUZZ_EXAMPLES."""
    return max(1, int(n * SCALE))
