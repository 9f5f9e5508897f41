"""The paper harness (clients/paper): its baselines are the engine's tasks, its runs complete.

* Each SeqS/ParS model (a task merged into a backbone copy, adapters hooked) gives the
  engine's output for that task (fp32, 1e-4), for every PET type and some variants; and
  HF PEFT's mixed-adapter batch gives the engine's LoRA outputs.
* ``python -m clients.paper all --quick`` on bert-tiny writes, for every experiment, a run
  folder with its manifest, CSV and plot, and a summary; the in-run pets-vs-SeqS check agrees.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.paper import __main__ as harness
from clients.paper.baselines import (
    MERGERS,
    ParS,
    PeftMixedBatch,
    SeqS,
    TaskModel,
    backbone_model,
    task_model,
)
from pets.backbone import load_backbone, resolve_checkpoint
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task

TOL = 1e-4
CLS = HeadConfig("classification", num_labels=3)
VARIANTS = [(t, CLS, {}) for t in sorted(pet_types())] + [
    (
        "lora",
        HeadConfig("embedding", pooling="mean", normalize=True),
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": [
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
        },
    ),
    (
        "lora",
        CLS,
        {
            "r": 8,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": ["value", "intermediate.dense"],
        },
    ),
    ("adapter", HeadConfig("embedding", pooling="cls"), {"bottleneck": 8, "activation": "gelu"}),
    (
        "ia3",
        CLS,
        {
            "target_modules": ["query", "attention.output.dense", "output.dense"],
            "feedforward_modules": ["output.dense"],
        },
    ),
    ("diff_pruning", CLS, {"density": 0.05}),
]


@pytest.fixture(scope="module")
def tiny():
    w = load_backbone(resolve_checkpoint("bert-tiny"))
    engine = Engine.from_parameters(
        {"BACKBONE": "bert-tiny", "TASK_STORE": tempfile.mkdtemp(), "REFRESH_MS": "0"},
        device="cpu",
    )
    yield w, engine, backbone_model(w)
    engine.close()


def _engine_out(engine: Engine, slot: int, ids: list[np.ndarray]) -> np.ndarray:
    batch = engine.encoder.batch(ids, [slot] * len(ids))
    out, width = engine.encoder.forward(batch)
    rows = np.empty((len(ids), out.shape[1]), dtype=np.float32)
    rows[batch.order] = out.numpy()
    return rows[:, : int(width.max())]


def test_every_type_has_a_merger():
    assert set(pet_types()) <= set(MERGERS), "add a merger to clients/paper/baselines.py"


@pytest.mark.parametrize("pet,head,hparams", VARIANTS, ids=lambda v: str(v)[:40])
def test_seqs_model_equals_engine(tiny, pet, head, hparams):
    w, engine, base = tiny
    rng = np.random.default_rng(len(hparams))
    manifest, tensors = random_task(
        w, f"p_{pet}_{len(hparams)}", pet, head, seed=3, hparams=hparams
    )
    slot = engine.registry.add(manifest, tensors).slot
    ids = [rng.integers(1000, w.spec.vocab, 12) for _ in range(3)]
    want = _engine_out(engine, slot, ids)
    x = torch.as_tensor(np.stack(ids))
    got = task_model(w, manifest, tensors, base=base)(x, torch.ones_like(x)).numpy()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"{pet} {hparams}")
    if pet != "none":  # the merge must matter: the bare backbone's output is different
        bare = TaskModel(base, head, tensors)  # the bare backbone under the task's head
        assert np.abs(bare(x, torch.ones_like(x)).numpy() - want).max() > 2 * TOL


def test_seqs_pars_and_peft_mixed_batch_agree_with_engine(tiny):
    w, engine, base = tiny
    tasks = [random_task(w, f"mix_lora{k}", "lora", CLS, seed=20 + k) for k in range(3)]
    slots = [engine.registry.add(m, t).slot for m, t in tasks]
    rng = np.random.default_rng(5)
    ids = [rng.integers(1000, w.spec.vocab, 10) for _ in range(3)]
    want = np.concatenate([_engine_out(engine, s, [i]) for s, i in zip(slots, ids, strict=True)])
    inputs = [(torch.as_tensor(i)[None], torch.ones(1, len(i), dtype=torch.long)) for i in ids]
    models = [task_model(w, m, t, base=base) for m, t in tasks]
    dev = torch.device("cpu")
    pars = ParS(models, dev)
    for system in (SeqS(models, dev), pars):
        got = torch.cat(system(inputs)).numpy()
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=system.name)
    pars.close()
    peft = PeftMixedBatch(w, tasks, dev, torch.float32)
    x = torch.as_tensor(np.stack(ids))
    pooled = peft(x, torch.ones_like(x), [m.name for m, _ in tasks])
    logits = np.stack(
        [
            torch.nn.functional.linear(
                pooled[k], t["classifier.weight"], t["classifier.bias"]
            ).numpy()
            for k, (_, t) in enumerate(tasks)
        ]
    )
    np.testing.assert_allclose(logits, want, atol=TOL, rtol=0)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_quick_harness_writes_every_experiment(tmp_path):
    rc = harness.main(
        [
            "all",
            "--quick",
            "--model",
            "bert-tiny",
            "--device",
            "cpu",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--pet-types",
            "lora,adapter,bitfit",
            "--no-online",
            "--out",
            str(tmp_path),
        ]
    )
    folders = {p.name.split("_", 2)[2]: p for p in tmp_path.iterdir()}
    expected = {
        "fig7": "fig7.csv",
        "fig8": "fig8.csv",
        "peft_mixed": "peft_mixed.csv",
        "fig9": "fig9.csv",
        "fig11": "fig11.csv",
        "fig12": "fig12.csv",
        "table5": "capacity.csv",
        "paper_all": "summary.csv",
    }
    assert set(expected) <= set(folders), sorted(folders)
    for name, table in expected.items():
        manifest = json.loads((folders[name] / "manifest.json").read_text())
        assert manifest["status"] == "ok", (name, manifest["status"])
        assert _rows(folders[name] / table), f"{name}: empty {table}"
        if name != "paper_all":
            pngs = list(folders[name].glob("*.png"))
            assert pngs and all(p.stat().st_size > 5000 for p in pngs), name
    summary = _rows(folders["paper_all"] / "summary.csv")
    assert [r["status"] for r in summary] == ["ok"] * (len(harness.EXPERIMENTS) - 1), summary
    assert rc == 0
    fig8 = _rows(folders["fig8"] / "fig8.csv")
    assert {r["system"] for r in fig8} == {"seqs", "pars", "pets", "pets_run"}
    assert max(float(r["max_abs_diff_pets_vs_seqs"]) for r in fig8) < TOL
    fig7 = _rows(folders["fig7"] / "fig7.csv")
    assert all(float(r["qps_norm"]) == 1.0 for r in fig7 if r["tasks"] == "1")
    fig9 = _rows(folders["fig9"] / "fig9.csv")
    for r in fig9:  # the categories cover the profiled time
        shares = sum(float(r[k]) for k in r if k.endswith("_share"))
        assert abs(shares - 1) < 0.01, r
    lora = next(r for r in fig9 if r["pet_type"] == "lora")
    bitfit = next(r for r in fig9 if r["pet_type"] == "bitfit" and r["config"] == lora["config"])
    assert float(lora["pet_us"]) > float(bitfit["pet_us"])  # LoRA has shadow GEMMs, BitFit none


def test_harness_imports_without_transformers():
    """Only the HF baselines need transformers: on a host whose transformers cannot import
    beside `.venv`'s numpy 1.x, fig7 / fig9 / fig11 / fig8_online / table5 still run."""
    import subprocess
    import sys

    code = "import sys, clients.paper.__main__; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_fig9_device_total_counts_kernels_once():
    """The ``pets/`` ranges' own device-timeline spans are not kernels: counting them charged
    the same kernels again to ``other`` (the first H100 run's 85% ``other``)."""
    from types import SimpleNamespace

    from clients.paper.fig9 import device_total

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        SimpleNamespace(name="pets/epilogue", device_type=cuda, device_time=50.0),  # a span
        SimpleNamespace(name="pets/gemm/qkv", device_type=cuda, device_time=30.0),  # a span
        SimpleNamespace(name="sm90_xmma_gemm", device_type=cuda, device_time=20.0),
        SimpleNamespace(name="Memcpy HtoD", device_type=cuda, device_time=2.0),
        SimpleNamespace(name="pets/gemm/qkv", device_type=cpu, device_time=0.0),
    ]
    assert device_total(events) == 22.0


@pytest.mark.slow
@pytest.mark.triton
def test_served_fig8_quick(tmp_path):
    """One tritonserver with pets_all + a model per task (2 tasks, bert-tiny, CPU)."""
    if not (Path(__file__).resolve().parents[1] / "build/triton/env.sh").is_file():
        pytest.skip("Triton runtime not assembled: run `bash build/install_triton.sh`")
    assert (
        harness.main(
            ["fig8_online", "--quick", "--model", "bert-tiny", "--no-gpu", "--out", str(tmp_path)]
        )
        == 0
    )
    (folder,) = tmp_path.iterdir()
    rows = _rows(folder / "fig8_online.csv")
    assert {r["system"] for r in rows} == {"seqs", "pars", "pets"}
    assert all(float(r["seq_per_s"]) > 0 for r in rows)
    assert (folder / "fig8_online.png").stat().st_size > 5000
    assert json.loads((folder / "manifest.json").read_text())["status"] == "ok"


def test_fig8_online_without_tritonclient_stops_before_the_server(monkeypatch, tmp_path):
    """A host without tritonclient (the offline GPU host, 2026-12-07) learns it at once, not
    after the 17-model server has started."""
    import argparse

    from clients.paper import fig8_online

    def no_client(*a, **k):
        raise ImportError("No module named 'tritonclient'")

    def must_not_run(*a, **k):
        raise AssertionError("the repository was written before the client check")

    monkeypatch.setattr(fig8_online, "client_module", no_client)
    monkeypatch.setattr(fig8_online, "write_repository", must_not_run)
    args = argparse.Namespace(quick=True, tasks=None, seq=None, rounds=None, gpu=False)
    with pytest.raises(SystemExit, match="tritonclient"):
        fig8_online.run(args, out=None)


def test_fig8_online_delay_is_pets_alls_alone(tmp_path):
    """``--queue-delay-us`` gives pets_all a batching window; the task models (SeqS/ParS, one
    request at a time each) keep the shipped config's delay, so only pets waits for a batch."""
    import re

    from clients.paper.fig8_online import write_repository

    repo = tmp_path / "repo"
    names = write_repository(repo, "bert-tiny", 2, ("lora", "bitfit"), False, 0, 1500)
    assert len(names) == 2
    delays = {
        m.name: re.findall(r"max_queue_delay_microseconds: (\d+)", (m / "config.pbtxt").read_text())
        for m in repo.iterdir()
    }
    shipped = (
        Path(__file__).resolve().parents[1] / "model_repository/pets/config.pbtxt"
    ).read_text()
    (keep,) = re.findall(r"max_queue_delay_microseconds: (\d+)", shipped)
    assert keep != "1500"
    assert delays == {"pets_all": ["1500"], "task_0": [keep], "task_1": [keep]}
