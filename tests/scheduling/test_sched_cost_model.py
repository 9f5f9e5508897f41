"""Cost table interpolation/extrapolation, JSON round trip, analytic fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pets.errors import ConfigError
from pets.pet import pet_types
from pets.scheduling import (
    PET_TYPES,
    AnalyticModel,
    CostTable,
    Query,
    batch_cost,
    load_cost_model,
)
from pets.scheduling.cost_model import CostLattice, beta_by_type, compatibility_warnings


def linear_table() -> CostTable:
    """alpha = 1 + 2b + 3s + 0.5bs: bilinear on any grid, so interpolation is exact."""
    bs, ss = (1, 2, 4, 8), (8, 16, 32)
    b, s = np.meshgrid(bs, ss, indexing="ij")
    alpha = 1 + 2 * b + 3 * s + 0.5 * b * s
    return CostTable(
        batch_sizes=bs,
        seq_lens=ss,
        alpha_values=alpha,
        total_tokens=(100, 200),
        alpha_packed_values=np.array([1.0, 3.0]),
        beta_values={"lora": alpha / 10},
        measured={"alpha": np.ones(alpha.shape, bool)},
        device="NVIDIA H100",
        dtype="float16",
        backbone_fingerprint="abc123",
        fallback=AnalyticModel.for_device("cpu"),
        meta={"note": "test"},
    )


def f(b, s):
    return 1 + 2 * b + 3 * s + 0.5 * b * s


def test_exact_at_grid_points():
    t = linear_table()
    for b in (1, 2, 4, 8):
        for s in (8, 16, 32):
            assert float(t.alpha(b, s)) == pytest.approx(f(b, s))


def test_bilinear_between_points():
    t = linear_table()
    assert float(t.alpha(3, 12)) == pytest.approx(f(3, 12))
    assert float(t.alpha(6, 24)) == pytest.approx(f(6, 24))
    # a non-bilinear surface: the midpoint is the mean of the four corners
    t2 = CostTable(
        batch_sizes=(1, 3), seq_lens=(10, 20), alpha_values=np.array([[0.0, 1.0], [4.0, 9.0]])
    )
    assert float(t2.alpha(2, 15)) == pytest.approx((0 + 1 + 4 + 9) / 4)


def test_linear_extrapolation_beyond_both_ends():
    t = linear_table()
    # along one axis the function is linear, so extrapolation reproduces it exactly
    assert float(t.alpha(16, 16)) == pytest.approx(f(16, 16))
    assert float(t.alpha(64, 128)) == pytest.approx(f(64, 128))
    assert float(t.alpha(2, 4)) == pytest.approx(f(2, 4))
    assert float(t.alpha_packed(400)) == pytest.approx(7.0)  # slope 0.02 per token
    assert float(t.alpha_packed(50)) == pytest.approx(0.0)  # 1 - 50*0.02 = 0
    assert float(t.alpha_packed(10)) == 0.0  # clamped at 0 s


def test_vectorised_lookup_broadcasts():
    t = linear_table()
    b = np.arange(1, 20)[:, None]
    s = np.array([5, 8, 30, 100])[None, :]
    np.testing.assert_allclose(t.alpha(b, s), f(b, s))


def test_single_point_axis_is_constant():
    t = CostTable(batch_sizes=(4,), seq_lens=(8, 16), alpha_values=np.array([[1.0, 2.0]]))
    assert float(t.alpha(100, 8)) == pytest.approx(1.0)
    assert float(t.alpha(1, 24)) == pytest.approx(3.0)


def test_json_round_trip(tmp_path):
    t = linear_table()
    p = tmp_path / "sub" / "table.json"
    t.save(p)
    d = json.loads(p.read_text())
    assert d["format_version"] == 1 and d["units"] == "seconds"
    assert d["device"] == "NVIDIA H100" and d["dtype"] == "float16"
    assert d["backbone_fingerprint"] == "abc123"
    assert d["grid"]["batch_sizes"] == [1, 2, 4, 8]
    u = CostTable.load(p)
    np.testing.assert_array_equal(u.alpha_values, t.alpha_values)
    np.testing.assert_array_equal(u.beta_values["lora"], t.beta_values["lora"])
    np.testing.assert_array_equal(u.alpha_packed_values, t.alpha_packed_values)
    assert u.measured["alpha"].all() and not u.measured["beta/lora"].any()
    assert (u.device, u.dtype, u.backbone_fingerprint) == (t.device, t.dtype, "abc123")
    assert u.fallback == t.fallback and u.meta == {"note": "test"}
    assert float(u.alpha(5, 20)) == float(t.alpha(5, 20))
    assert list(tmp_path.joinpath("sub").iterdir()) == [p]  # no temp files left


def test_bad_files_raise_config_error(tmp_path):
    p = tmp_path / "t.json"
    d = linear_table().to_json_dict()
    p.write_text(json.dumps({**d, "format_version": 99}))
    with pytest.raises(ConfigError, match=r"format_version=99.*pets profile"):
        CostTable.load(p)
    d["values"]["alpha"] = [[1.0]]
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="shape"):
        CostTable.load(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        CostTable.load(p)
    with pytest.raises(ConfigError, match="strictly increasing"):
        CostTable(batch_sizes=(2, 1), seq_lens=(1,), alpha_values=np.zeros((2, 1)))


def test_analytic_formula():
    m = AnalyticModel(hidden=768, layers=12, ffn=3072, flops_per_s=1e12, overhead_s=1e-3)
    c1 = 12 * (8 * 768**2 + 4 * 768 * 3072) / 1e12
    l0 = 2 * 768 + 3072
    for b, s in [(1, 8), (32, 32), (7, 128)]:
        assert float(m.alpha(b, s)) == pytest.approx(1e-3 + c1 * b * s * (1 + s / l0))
    # beta: more PET work costs more; every type is positive and grows with tokens
    kinds = PET_TYPES
    vals = {k: float(m.beta(k, 8, 64)) for k in kinds}
    assert vals["bitfit"] == vals["none"] < vals["ia3"]
    assert vals["diff_pruning"] < vals["maskbert"]
    assert all(float(m.beta(k, 16, 64)) > vals[k] > 0 for k in kinds)
    assert float(m.alpha_packed(1000)) > float(m.alpha_packed(100))
    assert float(AnalyticModel.for_device("cpu").alpha(8, 32)) > float(m.alpha(8, 32)) / 100


def test_every_registered_type_is_costed_and_unknown_ones_refused():
    m = AnalyticModel()
    assert tuple(pet_types()) == PET_TYPES
    assert all(float(m.beta(t, 4, 32)) > 0 for t in pet_types())
    with pytest.raises(ConfigError, match="no PET type 'prefix'"):
        m.beta("prefix", 4, 32)


def test_analytic_model_from_dict_round_trips_and_reads_old_tables():
    m = AnalyticModel.for_device("cpu").calibrated(0.5, 2.0)
    assert AnalyticModel.from_dict(m.to_dict()) == m
    # tables written before the types held their typical ranks carry two more fields
    old = {**m.to_dict(), "adapter_rank": 64, "lora_rank": 16}
    assert AnalyticModel.from_dict(old) == m
    with pytest.raises(ValueError, match="'rank'"):
        AnalyticModel.from_dict({**m.to_dict(), "rank": 3})


def test_fallbacks():
    t = linear_table()
    assert float(t.beta("maskbert", 4, 16)) == float(t.fallback.beta("maskbert", 4, 16))
    empty = CostTable(batch_sizes=(1,), seq_lens=(8,), alpha_values=np.ones((1, 1)))
    assert float(empty.alpha_packed(300)) == float(empty.fallback.alpha_packed(300))
    assert isinstance(load_cost_model(None), AnalyticModel)
    assert isinstance(load_cost_model("/nonexistent/table.json"), AnalyticModel)


def test_compatibility_warnings():
    t = linear_table()
    assert compatibility_warnings(t, "NVIDIA H100", "float16", "abc123") == []
    w = compatibility_warnings(t, "cpu", "float32", "abc123")
    assert len(w) == 2 and "pets profile" in w[0]


def test_batch_cost_padded_and_packed():
    m = AnalyticModel()
    qs = [Query(0, 0, "lora", 10), Query(1, 0, "lora", 30), Query(2, 1, "bitfit", 20)]
    padded = batch_cost(m, qs, 30)
    expect = float(m.alpha(3, 30) + m.beta("lora", 2, 30) + m.beta("bitfit", 1, 30))
    assert padded == pytest.approx(expect)
    packed = batch_cost(m, qs, 0)
    expect = float(m.alpha_packed(60) + m.beta("lora", 2, 20) + m.beta("bitfit", 1, 20))
    assert packed == pytest.approx(expect)


@pytest.mark.parametrize(
    "model", [linear_table(), AnalyticModel.for_device("cuda")], ids=["table", "analytic"]
)
def test_cost_lattice_returns_exactly_the_wrapped_model(model):
    lat = CostLattice(model)
    sizes = np.arange(0, 300, 7, dtype=np.float64)[None, :]
    lens = np.array([1.0, 17.0, 64.0, 200.0, 513.0])[:, None]  # past the first lattice
    np.testing.assert_array_equal(lat.alpha(sizes, lens), model.alpha(sizes, lens))
    for t in ("lora", "adapter"):  # one measured beta, one analytic fallback
        np.testing.assert_array_equal(lat.beta(t, sizes, lens), model.beta(t, sizes, lens))
    assert lat._grids[None].shape == (512, 1024)  # grew to powers of two past the asks
    # Off the lattice (fractional or negative), and packed: the wrapped model answers.
    for b, s in ((2.5, 16), (-1, 16), (4, 16.5)):
        assert float(lat.alpha(b, s)) == float(model.alpha(b, s))
    assert float(lat.alpha_packed(150)) == float(model.alpha_packed(150))


def test_cost_lattice_too_large_falls_back():
    model = AnalyticModel.for_device("cpu")
    lat = CostLattice(model, max_cells=1000)
    assert float(lat.alpha(4, 4096)) == float(model.alpha(4, 4096))
    assert None not in lat._grids


def test_beta_by_type_matches_per_type_calls():
    names = ["adapter", "lora", "maskbert"]
    which = np.array([[0, 1, 2, 1, 0]])
    sizes = np.array([[1.0, 3.0, 8.0, 40.0, 2.0]])
    lens = np.array([[16.0], [33.0], [300.0]])
    for model in (linear_table(), AnalyticModel.for_device("cuda")):
        want = np.stack(
            [
                [float(model.beta(names[w], b, s)) for w, b in zip(which[0], sizes[0], strict=True)]
                for s in lens[:, 0]
            ]
        )
        for m in (model, CostLattice(model)):
            np.testing.assert_allclose(beta_by_type(m, names, which, sizes, lens), want, rtol=1e-12)
    frac = np.array([[1.5, 3.0, 8.0, 40.0, 2.0]])  # off the lattice: per-type fallback
    np.testing.assert_allclose(
        beta_by_type(CostLattice(linear_table()), names, which, frac, 16),
        beta_by_type(linear_table(), names, which, frac, 16),
    )


def test_cost_lattice_keeps_one_stack_over_all_types():
    lat = CostLattice(AnalyticModel.for_device("cuda"))
    for names in (["lora"], ["adapter", "lora"], ["bitfit", "lora", "maskbert"], ["lora"]):
        which = np.arange(len(names))
        got = beta_by_type(lat, names, which, np.full(len(names), 4.0), 32.0)
        want = [float(lat.model.beta(n, 4.0, 32.0)) for n in names]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert lat._stack is not None and lat._stack.shape[0] == 4  # one row per type seen
