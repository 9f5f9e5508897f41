"""Profiler: measured entries, time budget with analytic fill, failures, CLI."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

from pets.scheduling import AnalyticModel, CostTable, ProfileGrid, profile
from pets.scheduling.profiler import add_profile_arguments, profile_cli

BASE = AnalyticModel()
GRID = ProfileGrid(
    batch_sizes=(1, 4, 16),
    seq_lens=(8, 32),
    total_tokens=(64, 512),
    beta_batch_sizes=(1, 8),
    pet_types=("lora", "bitfit"),
)


def fake_measure(kind: str, b: int, s: int) -> float:
    """Exactly twice the analytic model, so the fill's calibration is checkable."""
    if kind == "alpha":
        return 2 * float(BASE.alpha(b, s))
    if kind == "alpha_packed":
        return 2 * float(BASE.alpha_packed(b))
    return 2 * float(BASE.beta(kind, b, s))


def test_full_profile_measures_every_entry():
    calls = []
    t = profile(
        lambda k, b, s: calls.append((k, b, s)) or fake_measure(k, b, s),
        GRID,
        progress=False,
        analytic=BASE,
        device="dev",
        dtype="float16",
        backbone_fingerprint="fp",
    )
    assert len(calls) == 3 * 2 + 2 + 2 * 2 * 2
    assert len(set(calls)) == len(calls)
    assert t.measured_fraction() == 1.0
    assert float(t.alpha(4, 32)) == pytest.approx(fake_measure("alpha", 4, 32))
    assert float(t.beta("lora", 8, 8)) == pytest.approx(fake_measure("lora", 8, 8))
    assert float(t.alpha_packed(512)) == pytest.approx(fake_measure("alpha_packed", 512, 0))
    assert (t.device, t.dtype, t.backbone_fingerprint) == ("dev", "float16", "fp")


def test_time_budget_stops_and_fills_from_calibrated_analytic():
    def slow(kind, b, s):
        time.sleep(0.02)
        return fake_measure(kind, b, s)

    t0 = time.perf_counter()
    t = profile(slow, GRID, progress=False, time_budget_s=0.15, analytic=BASE)
    assert time.perf_counter() - t0 < 0.15 + 0.05
    frac = t.measured_fraction()
    assert 0 < frac < 1
    # every kind got some measurements first (round-robin)
    assert t.measured["alpha"].any() and t.measured["alpha_packed"].any()
    # unmeasured entries = analytic × median ratio (= 2 here)
    not_measured = ~t.measured["alpha"]
    assert not_measured.any()
    b = np.array(GRID.batch_sizes)[:, None]
    s = np.array(GRID.seq_lens)[None, :]
    np.testing.assert_allclose(t.alpha_values, 2 * BASE.alpha(b, s), rtol=1e-12)
    np.testing.assert_allclose(
        t.beta_values["bitfit"], 2 * BASE.beta("bitfit", np.array([[1], [8]]), s), rtol=1e-12
    )
    assert t.meta["attempted"] < t.meta["entries"]


def test_failures_are_filled_and_all_failing_raises():
    def oom_big(kind, b, s):
        if b >= 16:
            raise RuntimeError("CUDA out of memory")
        return fake_measure(kind, b, s)

    t = profile(oom_big, GRID, progress=False, analytic=BASE)
    assert not t.measured["alpha"][2].any() and t.measured["alpha"][:2].all()
    assert float(t.alpha(16, 8)) == pytest.approx(fake_measure("alpha", 16, 8))
    assert t.meta["failures"]

    def broken(kind, b, s):
        raise ValueError("engine not loaded")

    with pytest.raises(ValueError, match="engine not loaded"):
        profile(broken, GRID, progress=False)


def test_progress_output_without_errors(capsys):
    profile(fake_measure, GRID, progress=True, analytic=BASE)


def test_profile_cli_round_trip(tmp_path):
    parser = add_profile_arguments(argparse.ArgumentParser())
    out = tmp_path / "t.json"
    args = parser.parse_args(
        [
            "-o",
            str(out),
            "--batch-sizes",
            "1,4",
            "--seq-lens",
            "8,16",
            "--total-tokens",
            "64",
            "--beta-batch-sizes",
            "1,2",
            "--pet-types",
            "lora,adapter",
            "--no-progress",
        ]
    )
    assert profile_cli(args, fake_measure, device="cpu", backbone_fingerprint="x") == 0
    t = CostTable.load(out)
    assert t.batch_sizes == (1, 4) and t.pet_types == ("lora", "adapter")
    assert t.measured_fraction() == 1.0 and t.device == "cpu"
    bad = parser.parse_args(["-o", str(out), "--pet-types", "lorra", "--no-progress"])
    assert profile_cli(bad, fake_measure) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-sizes", "4,2"])
