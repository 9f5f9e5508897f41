"""The per-type matrix: every registered PET type, checked the same way.

For each type in ``pets.pet.pet_types()``: its config parses the hyper-parameters its
generator writes and round-trips; bad values are refused with an error naming the key; its
random tasks validate (and load); the served output (engine, CPU, fp32) matches the type's
oracle in ``tests/oracle.py`` within the parity tolerance, and differs from the bare
backbone's (equals it, for the one type that declares ``changes_output = False``).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from oracle import ATOL, ORACLES, base_model, oracle_output, task_model

from pets.engine import Engine
from pets.errors import TaskError
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import read_task, write_task
from pets.validate import validate_task

TYPES = list(pet_types())
HEAD = HeadConfig("classification", num_labels=3)
# (type, config field) for every field of every type's config
FIELDS = [(t, f.name) for t, cls in pet_types().items() for f in fields(cls.Config)]


def _task(backbone: Any, pet: str, seed: int = 5) -> tuple[Any, dict[str, torch.Tensor]]:
    return random_task(backbone, f"matrix_{pet}", pet, HEAD, seed=seed)


def test_every_type_has_an_oracle() -> None:
    missing = sorted(set(TYPES) - set(ORACLES))
    assert not missing, f"PET types without an oracle in tests/oracle.py ORACLES: {missing}"
    assert not set(ORACLES) - set(TYPES), "oracles for types that are not registered"


def test_codes_are_unique_and_order_the_registry() -> None:
    codes = [cls.code for cls in pet_types().values()]
    assert codes == sorted(set(codes))


@pytest.mark.parametrize("pet", TYPES)
def test_config_round_trips(pet: str, backbone: Any) -> None:
    cls = pet_types()[pet]
    manifest, _ = _task(backbone, pet)
    cfg = cls.Config.from_hparams(manifest.hparams)
    assert cls.Config.from_hparams(cfg.to_hparams()) == cfg
    # keys a config does not name are informational, as in stored manifests
    assert cls.Config.from_hparams({**manifest.hparams, "note": "informational"}) == cfg


@pytest.mark.parametrize(("pet", "key"), FIELDS)
@pytest.mark.parametrize("bad", [{"not": "valid"}, float("nan"), "nonsense"])
def test_config_refuses_bad_values(pet: str, key: str, bad: Any, backbone: Any) -> None:
    """No config field takes a mapping, a NaN or a made-up word; the error names the key."""
    manifest, _ = _task(backbone, pet)
    with pytest.raises(TaskError, match=key):
        pet_types()[pet].Config.from_hparams({**manifest.hparams, key: bad})


@pytest.mark.parametrize("pet", TYPES)
def test_random_tasks_validate_and_are_reproducible(pet: str, backbone: Any) -> None:
    manifest, tensors = _task(backbone, pet)
    validate_task(backbone, manifest, tensors, trial_load=True)
    again = _task(backbone, pet)[1]
    assert sorted(again) == sorted(tensors)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.fixture(scope="module")
def matrix_store(tmp_path_factory: pytest.TempPathFactory, backbone: Any) -> Path:
    store = tmp_path_factory.mktemp("pet_matrix")
    for seed, pet in enumerate(TYPES, start=300):
        write_task(store, *_task(backbone, pet, seed))
    return store


@pytest.fixture(scope="module")
def matrix_engine(matrix_store: Path) -> Engine:
    eng = Engine.from_parameters({"TASK_STORE": str(matrix_store), "REFRESH_MS": "0"})
    assert not eng.load_errors, eng.load_errors
    assert eng.device.type == "cpu" and eng.dtype == torch.float32
    return eng


@pytest.mark.parametrize("pet", TYPES)
def test_served_output_matches_the_oracle(
    pet: str, matrix_store: Path, matrix_engine: Engine, backbone: Any
) -> None:
    rng = np.random.default_rng(7)
    seqs = [
        np.r_[101, rng.integers(1000, backbone.spec.vocab, size=int(n)), 102]
        for n in rng.integers(1, 40, size=3)
    ]
    name = f"matrix_{pet}"
    manifest, tensors = read_task(matrix_store / name)
    model, bare = task_model(backbone, manifest, tensors), base_model(backbone)
    served = matrix_engine.run(seqs, [name] * len(seqs))
    effect = 0.0
    for ids, got in zip(seqs, served, strict=True):
        want = oracle_output(model, manifest, tensors, ids)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=pet)
        plain = oracle_output(bare, manifest, tensors, ids)
        effect = max(effect, float(np.abs(plain - want).max()))
    if pet_types()[pet].changes_output:
        assert effect > 1e-2, f"{pet}: the PET has no visible effect ({effect:.2e})"
    else:
        assert effect <= ATOL, f"{pet} declares changes_output=False but moved it by {effect}"


def test_diff_pruning_positions_are_distinct_sorted_and_uniform() -> None:
    """Diff-Pruning's random positions: exactly ``k`` distinct, sorted, every position about
    equally likely (the draw-and-deduplicate sampler must not favour any)."""
    from pets.pet.diff_pruning import sample_positions

    g = torch.Generator().manual_seed(0)
    for n, k in ((3072 * 768, 23592), (100, 0), (100, 1), (100, 50), (100, 51), (100, 100)):
        got = sample_positions(n, k, g)
        assert got.numel() == k and got.unique().numel() == k
        assert bool((got[1:] > got[:-1]).all()) and (k == 0 or 0 <= int(got[0]) <= int(got[-1]) < n)
    counts = torch.zeros(100)
    for _ in range(4000):
        counts[sample_positions(100, 10, g)] += 1
    # 400 expected per position, binomial sd about 19: 6 sd either side
    assert counts.min() > 286 and counts.max() < 514, (counts.min(), counts.max())
    with pytest.raises(ValueError, match="cannot pick 5 distinct positions of 4"):
        sample_positions(4, 5, g)


@pytest.mark.parametrize("shape", [(6, 64), (3, 96), (5, 40), (3, 7)])
def test_maskbert_keep_words_equal_the_unpacked_mask_repacked(shape: tuple[int, int]) -> None:
    """MaskBERT's load turns a stored keep-mask into ``seg_masked_mm``'s words: where rows
    fill whole words by reading the bytes as int32, else by unpacking. Both must equal the
    numpy unpacking (the oracle's) packed by the reference op."""
    from petops.reference import pack_mask_words
    from pets.pet.maskbert import keep_words, pack_mask, set_bits, unpack_bits, unpack_mask

    keep = torch.from_numpy(np.random.default_rng(sum(shape)).random(shape) < 0.7)
    packed = pack_mask(keep)
    assert torch.equal(unpack_mask(packed, shape), keep)
    assert torch.equal(unpack_bits(packed, shape), keep)
    assert torch.equal(keep_words(packed, shape), pack_mask_words(keep))
    assert int(set_bits(packed)) == int(keep.sum())


def test_diff_pruning_positions_in_any_order_and_repeats_refused(
    matrix_store: Path, matrix_engine: Engine, backbone: Any
) -> None:
    """Positions may come in any order (the engine sorts them, their values with them) and
    serve as the sorted task does; a repeated position is refused, naming its tensor."""
    manifest, tensors = read_task(matrix_store / "matrix_diff_pruning")
    perm = torch.Generator().manual_seed(0)
    shuffled = dict(tensors)
    for key in [k for k in tensors if k.endswith("weight_delta_indices")]:
        order = torch.randperm(tensors[key].numel(), generator=perm)
        vkey = key.replace("indices", "values")
        shuffled[key], shuffled[vkey] = tensors[key][order], tensors[vkey][order]
    assert not torch.equal(shuffled[key], tensors[key])
    manifest.name = "dp_shuffled"
    matrix_engine.registry.add(manifest, shuffled)
    try:
        seqs = [np.array([101, 2000 + i, 3000, 4000, 102]) for i in range(3)]
        want = matrix_engine.run(seqs, ["matrix_diff_pruning"] * 3)
        for got, exp in zip(matrix_engine.run(seqs, ["dp_shuffled"] * 3), want, strict=True):
            np.testing.assert_allclose(got, exp, atol=1e-6, rtol=0)
    finally:
        matrix_engine.registry.remove("dp_shuffled")
    repeated = dict(tensors)
    repeated[key] = torch.cat([tensors[key][1:2], tensors[key][1:]])
    with pytest.raises(TaskError, match=f"{key}.*repeats positions"):
        validate_task(backbone, manifest, repeated)
