"""Adapter output sites: the fused ``adapter_residual_layernorm`` path vs the unfused ops.

The engine computes an output site whose only transform is adapters in one op (bias,
adapter, residual, LayerNorm); with another output transform in the batch (IA3) it runs
bias -> grouped shrink/expand per activation -> LayerNorm. Both must equal the oracle and
each other, for adapters of different ranks and activations, adapters at one site only
(Pfeiffer) and non-adapter tasks in the same batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from oracle import oracle_output, task_model

from petops import compiled_available
from pets import kernels
from pets.batch import Batch
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet.adapter import ADAPTER_SITES, PARTS, Adapter, AdapterPlan
from pets.pet.common import layer_key
from pets.taskgen import random_task
from pets.taskstore import read_task, write_task

ATOL = 2e-4  # vs the oracle (fp32, as tests/test_parity.py)
HEAD = HeadConfig("classification", num_labels=3)

# name -> (pet type, hparams, adapter sites kept)
TASKS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "ad_relu_r4": ("adapter", {"bottleneck": 4, "activation": "relu"}, ("attn_out", "ffn_out")),
    "ad_gelu_r16": ("adapter", {"bottleneck": 16, "activation": "gelu"}, ("attn_out", "ffn_out")),
    "pf_silu_r8": ("adapter", {"bottleneck": 8, "activation": "silu"}, ("ffn_out",)),
    "pf_relu_r32": ("adapter", {"bottleneck": 32, "activation": "relu"}, ("ffn_out",)),
    "pf_gelunew_r2": ("adapter", {"bottleneck": 2, "activation": "gelu_new"}, ("ffn_out",)),
    "lora_qv": ("lora", {"r": 4}, ()),
    "bitfit": ("bitfit", {}, ()),
    "diff": ("diff_pruning", {"density": 0.02}, ()),
    "ia3_out": (
        "ia3",
        {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": []},
        (),
    ),
    "ia3_ff": ("ia3", {"target_modules": ["key", "value", "output.dense"]}, ()),  # no out scales
}
ADAPTERS = [n for n, (pet, _, _) in TASKS.items() if pet == "adapter"]
NO_IA3 = [n for n, (pet, _, _) in TASKS.items() if pet != "ia3"]


def _seqs(rng: np.random.Generator, n: int, vocab: int) -> list[np.ndarray]:
    lens = rng.integers(1, 30, size=n)
    return [np.r_[101, rng.integers(1000, vocab, size=int(k)), 102] for k in lens]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, backbone: Any) -> Path:
    path = tmp_path_factory.mktemp("adapter_store")
    for seed, (name, (pet, hp, sites)) in enumerate(TASKS.items(), start=200):
        manifest, tensors = random_task(backbone, name, pet, HEAD, seed=seed, hparams=hp)
        if pet == "adapter":  # drop the adapters of the other site (Pfeiffer: FFN only)
            module = {ADAPTER_SITES[s] for s in ADAPTER_SITES if s not in sites}
            tensors = {
                k: v for k, v in tensors.items() if not any(f".{m}.adapter." in k for m in module)
            }
        write_task(path, manifest, tensors)
    return path


@pytest.fixture(scope="module")
def eng(store: Path) -> Iterator[Engine]:
    e = Engine.from_parameters({"TASK_STORE": str(store), "REFRESH_MS": "0"})
    assert not e.load_errors, e.load_errors
    assert e.encoder.fuse_outputs  # the default
    yield e
    e.close()


@pytest.fixture(params=["reference", "compiled"])
def ops_mode(request: pytest.FixtureRequest, eng: Engine) -> Iterator[str]:
    if request.param == "compiled" and not compiled_available():
        pytest.skip("compiled op library not built; run build/build_ops.sh")
    saved = eng.ctx.ops
    eng.ctx.ops = kernels.select(request.param)[0]
    yield request.param
    eng.ctx.ops = saved


class _CountingOps:
    """Wraps an op module, counting calls per op name."""

    def __init__(self, ops: Any) -> None:
        self.ops, self.calls = ops, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.ops, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped


def _forward(eng: Engine, batch: Batch, fused: bool) -> tuple[torch.Tensor, Counter[str]]:
    """Encoder output for ``batch`` with output fusion on or off, and the ops it called."""
    saved_ops, saved_fuse = eng.ctx.ops, eng.encoder.fuse_outputs
    counting = _CountingOps(saved_ops)
    eng.ctx.ops, eng.encoder.fuse_outputs = counting, fused  # type: ignore[assignment]
    try:
        out, widths = eng.encoder.forward(batch)
    finally:
        eng.ctx.ops, eng.encoder.fuse_outputs = saved_ops, saved_fuse
    assert (widths == HEAD.num_labels).all()  # every task has the same head width
    return out[:, : HEAD.num_labels], counting.calls


def _batch(eng: Engine, seqs: list[np.ndarray], names: list[str]) -> Batch:
    return eng.encoder.batch(seqs, [eng.registry.slot_of(n) for n in names])


def test_adapters_match_the_oracle(eng: Engine, store: Path, backbone: Any, ops_mode: str) -> None:
    """Each adapter task (ranks 2..32, four activations, one or two sites) in one mixed
    batch with LoRA / BitFit / Diff-Pruning tasks matches its HF oracle (fused path)."""
    rng = np.random.default_rng(5)
    names = [NO_IA3[i % len(NO_IA3)] for i in range(2 * len(NO_IA3))]
    seqs = _seqs(rng, len(names), backbone.spec.vocab)
    batch = _batch(eng, seqs, names)
    out, calls = _forward(eng, batch, fused=True)
    assert calls["adapter_residual_layernorm"] == 2 * backbone.spec.layers
    got = dict(zip(batch.order.tolist(), out.numpy(), strict=True))  # request index -> row
    models = {}
    for name in set(names):
        manifest, tensors = read_task(store / name)
        models[name] = (task_model(backbone, manifest, tensors), manifest, tensors)
    for i, (ids, name) in enumerate(zip(seqs, names, strict=True)):
        want = oracle_output(*models[name], ids)
        np.testing.assert_allclose(got[i], want, atol=ATOL, rtol=0, err_msg=f"{name} {ops_mode}")


def test_fused_equals_unfused(eng: Engine, backbone: Any, ops_mode: str) -> None:
    """Same batch, fused vs unfused engine: same outputs; the fused one launches one op per
    adapter site and no shrink/expand, the unfused one no fused op."""
    rng = np.random.default_rng(6)
    names = [NO_IA3[i] for i in rng.integers(0, len(NO_IA3), size=40)]
    names += NO_IA3  # every task at least once
    seqs = _seqs(rng, len(names), backbone.spec.vocab)
    batch = _batch(eng, seqs, names)
    fused, f_calls = _forward(eng, batch, fused=True)
    unfused, u_calls = _forward(eng, batch, fused=False)
    np.testing.assert_allclose(fused.numpy(), unfused.numpy(), atol=1e-5, rtol=0)
    layers = backbone.spec.layers
    # attn_out: only the Houlsby tasks; ffn_out: all five adapters. Both sites fused.
    assert f_calls["adapter_residual_layernorm"] == 2 * layers
    assert u_calls["adapter_residual_layernorm"] == 0
    # LoRA's shrink/expand (q, v: one site) only; the adapter ones are gone
    assert f_calls["sgmv_shrink"] == layers
    # unfused: + one shrink per distinct activation per site (attn: relu, gelu; ffn: 4)
    assert u_calls["sgmv_shrink"] == layers * (1 + 2 + 4)


def test_one_adapter_site_and_no_adapter_site(eng: Engine, backbone: Any, ops_mode: str) -> None:
    """A batch of FFN-only adapters with BitFit: attn_out has no adapter (plain LayerNorm
    epilogue), ffn_out is fused; same as unfused and as each item alone."""
    rng = np.random.default_rng(7)
    names = ["bitfit", "pf_silu_r8", "pf_relu_r32", "bitfit", "pf_gelunew_r2", "pf_silu_r8"]
    seqs = _seqs(rng, len(names), backbone.spec.vocab)
    batch = _batch(eng, seqs, names)
    fused, calls = _forward(eng, batch, fused=True)
    unfused, _ = _forward(eng, batch, fused=False)
    np.testing.assert_allclose(fused.numpy(), unfused.numpy(), atol=1e-5, rtol=0)
    layers = backbone.spec.layers
    assert calls["adapter_residual_layernorm"] == layers  # ffn_out only
    assert calls["bias_residual_layernorm"] == 1 + layers  # embeddings + attn_out
    assert calls["sgmv_shrink"] == calls["bias_act"] - 2 * layers == 0  # qkv, ffn_in bias only
    for row, j in enumerate(batch.order):
        alone, _ = _forward(eng, _batch(eng, [seqs[j]], [names[j]]), fused=True)
        np.testing.assert_allclose(fused[row].numpy(), alone[0].numpy(), atol=1e-5, rtol=0)


def test_other_output_transform_falls_back(eng: Engine, backbone: Any, ops_mode: str) -> None:
    """With an IA3 output transform in the batch the adapters run unfused, and an adapter
    item there equals the same item alone (fused)."""
    rng = np.random.default_rng(8)
    names = ["ia3_out", *ADAPTERS, "lora_qv", "ia3_out"]
    seqs = _seqs(rng, len(names), backbone.spec.vocab)
    batch = _batch(eng, seqs, names)
    mixed, calls = _forward(eng, batch, fused=True)
    assert calls["adapter_residual_layernorm"] == 0
    assert calls["sgmv_shrink"] == backbone.spec.layers * (1 + 2 + 4)
    for row, j in enumerate(batch.order):
        alone, a_calls = _forward(eng, _batch(eng, [seqs[j]], [names[j]]), fused=True)
        if names[j] in ADAPTERS:
            assert a_calls["adapter_residual_layernorm"] > 0
        np.testing.assert_allclose(
            mixed[row].numpy(), alone[0].numpy(), atol=1e-5, rtol=0, err_msg=names[j]
        )


def test_ia3_without_output_scales_keeps_the_fused_path(
    eng: Engine, backbone: Any, ops_mode: str
) -> None:
    """IA3 tasks that scale only q/k/v and the FFN input have no output transform: with
    adapters in the batch the sites stay fused (while another loaded IA3 task, not in the
    batch, has output scales), and each row equals its task run alone."""
    rng = np.random.default_rng(11)
    names = ["ia3_ff", *ADAPTERS, "bitfit", "ia3_ff"]
    seqs = _seqs(rng, len(names), backbone.spec.vocab)
    batch = _batch(eng, seqs, names)
    mixed, calls = _forward(eng, batch, fused=True)
    unfused, u_calls = _forward(eng, batch, fused=False)
    layers = backbone.spec.layers
    assert eng.registry.methods["ia3"].has_output_transform  # ia3_out is loaded
    assert calls["adapter_residual_layernorm"] == 2 * layers
    assert calls["sgmv_shrink"] == 0
    assert u_calls["sgmv_shrink"] == layers * (2 + 4)  # per activation: attn 2, ffn 4
    np.testing.assert_allclose(mixed.numpy(), unfused.numpy(), atol=1e-5, rtol=0)
    for row, j in enumerate(batch.order):
        alone, _ = _forward(eng, _batch(eng, [seqs[j]], [names[j]]), fused=True)
        np.testing.assert_allclose(
            mixed[row].numpy(), alone[0].numpy(), atol=1e-5, rtol=0, err_msg=names[j]
        )


def test_plan_tables(eng: Engine, backbone: Any) -> None:
    """The per-segment tables cover every segment of the batch: rank 0 and offset 0 for
    non-adapter segments and absent sites, else the task's rank, activation and offsets."""
    rng = np.random.default_rng(9)
    names = ["bitfit", "ad_gelu_r16", "lora_qv", "pf_silu_r8", "ad_relu_r4", "diff"]
    batch = _batch(eng, _seqs(rng, len(names), backbone.spec.vocab), names)
    method = eng.registry.methods["adapter"]
    assert isinstance(method, Adapter)
    adapter_code = eng.registry.slots.segments(batch.seg_task_cpu).pet == method.code
    segs = torch.nonzero(adapter_code).flatten()
    plan = method.prepare(batch, segs)
    assert isinstance(plan, AdapterPlan)
    n_seg, layers = batch.num_segments, backbone.spec.layers
    assert plan.seg_rank.shape == (len(ADAPTER_SITES), n_seg)
    assert plan.seg_w_off.shape == (len(ADAPTER_SITES), layers, n_seg, len(PARTS))
    by_slot = {eng.registry.slot_of(n): n for n in names}
    want_max = [0] * len(ADAPTER_SITES)
    for s in range(n_seg):  # a loop is fine in a test
        name = by_slot[int(batch.seg_task_cpu[s])]
        pet, hp, sites = TASKS[name]
        for si, site in enumerate(ADAPTER_SITES):
            r = hp["bottleneck"] if pet == "adapter" and site in sites else 0
            want_max[si] = max(want_max[si], r)
            assert int(plan.seg_rank[si, s]) == r, (name, site)
            offs = plan.seg_w_off[si, :, s]  # [L, 4]
            if not r:
                assert not offs.any(), (name, site)
                continue
            # the offsets locate the task's own tensors in the pool
            _, tensors = read_task(eng.store / name)
            for layer in range(layers):
                for p, part in enumerate(PARTS):
                    t = tensors[layer_key(layer, ADAPTER_SITES[site], f"adapter.{part}")]
                    o = int(offs[layer, p])
                    stored = method.pool.data[o : o + t.numel()].view(t.shape)
                    torch.testing.assert_close(stored.cpu(), t.to(stored.dtype))
        code = int(plan.seg_act[s])
        if pet == "adapter":
            assert code == method.act[torch.tensor([eng.registry.slot_of(name)])].item()
            assert code != 0
        else:
            assert code == 0
    assert plan.max_rank == want_max


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fused_equals_unfused_in_half_precision(
    store: Path, eng: Engine, backbone: Any, dtype: str
) -> None:
    """16-bit engines: the fused op rounds where the unfused ops write a buffer, so the two
    paths differ only where an fp32 accumulation order flips a rounding (observed: a few
    elements by one ulp, grown through the later layers); either path is as close to fp32
    as the other, and their difference is well inside the dtype's own error."""
    rng = np.random.default_rng(10)
    names = [NO_IA3[i] for i in rng.integers(0, len(NO_IA3), size=24)] + NO_IA3
    seqs = _seqs(rng, len(names), backbone.spec.vocab)
    want, _ = _forward(eng, _batch(eng, seqs, names), fused=False)  # fp32
    half = Engine.from_parameters({"TASK_STORE": str(store), "REFRESH_MS": "0", "DTYPE": dtype})
    try:
        assert not half.load_errors, half.load_errors
        if compiled_available():
            half.ctx.ops = kernels.select("compiled")[0]
        batch = _batch(half, seqs, names)
        fused, calls = _forward(half, batch, fused=True)
        unfused, _ = _forward(half, batch, fused=False)
    finally:
        half.close()
    assert calls["adapter_residual_layernorm"] == 2 * backbone.spec.layers
    err_f = (fused.float() - want).abs().max().item()
    err_u = (unfused.float() - want).abs().max().item()
    assert 0 < err_u < (0.05 if dtype == "bfloat16" else 0.01)  # the dtype's own error
    assert err_f <= 1.5 * err_u, (err_f, err_u)
    assert (fused.float() - unfused.float()).abs().max().item() <= err_u
