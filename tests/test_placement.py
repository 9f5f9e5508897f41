"""Placement of the `pets` instances on a host's GPUs, on a CPU with fake device lists, and
``build/serve.sh``'s checks of its placement flags.

The generated configs are parsed with Triton's own ``ModelConfig`` protobuf (shipped in
tritonclient), so a field or enum Triton would refuse fails here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from pets.errors import ConfigError
from pets.placement import (
    Placement,
    main,
    parse_nvidia_smi,
    render_config,
    render_repository,
    select_gpus,
    visible_gpus,
)

ROOT = Path(__file__).resolve().parents[1]
# `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits`
SMI = """0, GPU-8a1f0c2e-0000-4000-8000-000000000000, NVIDIA H100 80GB HBM3, 81559
1, GPU-77b3aa01-0000-4000-8000-000000000001, NVIDIA H100 80GB HBM3, 81559
2, GPU-0c9e5d11-0000-4000-8000-000000000002, NVIDIA A100-SXM4-40GB, 40960
3, GPU-0c9e77aa-0000-4000-8000-000000000003, NVIDIA A100-SXM4-40GB, 40960
"""
HOST = parse_nvidia_smi(SMI)
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_parse_nvidia_smi() -> None:
    assert [(g.index, g.name, g.memory_mib) for g in HOST] == [
        (0, "NVIDIA H100 80GB HBM3", 81559),
        (1, "NVIDIA H100 80GB HBM3", 81559),
        (2, "NVIDIA A100-SXM4-40GB", 40960),
        (3, "NVIDIA A100-SXM4-40GB", 40960),
    ]
    assert parse_nvidia_smi("\n") == []
    with pytest.raises(ConfigError, match=r"line 2 is 'No devices were found'.*index, uuid"):
        parse_nvidia_smi(SMI.splitlines()[0] + "\nNo devices were found\n")


@pytest.mark.parametrize(
    ("cvd", "host_indices"),
    [
        (None, [0, 1, 2, 3]),
        ("2,0", [2, 0]),  # CUDA order is the variable's order
        ("GPU-77b3, 3", [1, 3]),  # a unique UUID prefix, spaces allowed
        ("1,7,2", [1]),  # enumeration stops at the first entry naming no GPU
        ("GPU-0c9e,0", []),  # an ambiguous prefix names no GPU
        ("", []),
        ("-1", []),
    ],
)
def test_visible_gpus_follow_cuda_visible_devices(cvd: str | None, host_indices: list[int]) -> None:
    vis = visible_gpus(HOST, cvd)
    assert [g.host_index for g in vis] == host_indices
    assert [g.index for g in vis] == list(range(len(host_indices)))  # renumbered 0..k-1


def test_visible_gpus_refuse_a_gpu_named_twice() -> None:
    with pytest.raises(ConfigError, match="names GPU 1 twice"):
        visible_gpus(HOST, "1,GPU-77b3aa01")


def test_select_gpus() -> None:
    vis = visible_gpus(HOST, "3,1")
    assert [g.host_index for g in select_gpus("all", vis)] == [3, 1]
    assert [g.host_index for g in select_gpus("1", vis)] == [1]
    with pytest.raises(ConfigError, match=r"no GPU \[2\] here; this process sees GPU 0 \(NVIDIA"):
        select_gpus("0,2", vis)
    with pytest.raises(ConfigError, match="lists a GPU twice"):
        select_gpus("0,0", vis)
    with pytest.raises(ConfigError, match="expected 'all' or a comma list"):
        select_gpus("first", vis)
    with pytest.raises(ConfigError, match=r"sees no GPU.*without --gpus"):
        select_gpus("all", [])


def test_one_named_group_per_gpu_in_triton_config() -> None:
    gpus = tuple(select_gpus("all", visible_gpus(HOST, "2,3,0")))
    placement = Placement(gpus=gpus, per_gpu=2)
    src = (ROOT / "model_repository" / "pets" / "config.pbtxt").read_text()
    cfg = parse(render_config(src, group=placement.instance_group("pets"), params={}))
    groups = [(g.name, g.kind, list(g.gpus), g.count) for g in cfg.instance_group]
    assert groups == [
        ("pets_gpu0", KIND_GPU, [0], 2),
        ("pets_gpu1", KIND_GPU, [1], 2),
        ("pets_gpu2", KIND_GPU, [2], 2),
    ]
    names = placement.instance_names("pets")
    assert len({n for n, _ in names}) == placement.instances == 6
    assert names[:3] == [("pets_gpu0_0", "cuda:0"), ("pets_gpu0_1", "cuda:0"),
                         ("pets_gpu1_0", "cuda:1")]  # fmt: skip
    one = Placement(gpus=gpus[:1], per_gpu=1)
    assert one.instance_names("pets") == [("pets_gpu0_0", "cuda:0")]
    assert Placement(cpu=2).instance_names("pets") == [("pets_0_0", "cpu"), ("pets_0_1", "cpu")]
    with pytest.raises(ConfigError, match="0 instances per device"):
        Placement(gpus=gpus, per_gpu=0)


def test_memory_budget_must_fit_each_gpu() -> None:
    gpus = tuple(visible_gpus(HOST, None))
    Placement(gpus=gpus, per_gpu=2).check_budget(20000)  # 40,000 MiB < 40,960 on the A100s
    with pytest.raises(ConfigError, match=r"21000 x 2 instances = 42000 MiB .* GPU 2 \(NVIDIA A1"):
        Placement(gpus=gpus, per_gpu=2).check_budget(21000)
    Placement(cpu=4).check_budget(10**9)  # no device memory to check on CPU


def test_render_config_sets_and_adds_parameters() -> None:
    src = (ROOT / "model_repository" / "pets" / "config.pbtxt").read_text()
    out = render_config(src, group=None, params={"DTYPE": "float16", "MEMORY_BUDGET_MB": "512"})
    cfg = parse(out)
    assert cfg.parameters["DTYPE"].string_value == "float16"
    assert cfg.parameters["MEMORY_BUDGET_MB"].string_value == "512"  # absent before: added
    assert (
        cfg.parameters["SCHEDULER"].string_value == parse(src).parameters["SCHEDULER"].string_value
    )
    with pytest.raises(ConfigError, match="found 0 one-line 'instance_group"):
        render_config("name: 'x'\n", group="instance_group [ ]", params={})
    with pytest.raises(ConfigError, match="holds a quote"):
        render_config(src, group=None, params={"TASK_STORE": 'a"b'})


def test_render_repository(tmp_path: Path) -> None:
    gpus = tuple(visible_gpus(HOST, "1"))
    models = render_repository(
        ROOT / "model_repository",
        tmp_path / "out",
        Placement(gpus=gpus, per_gpu=3),
        pets_params={"DTYPE": "bfloat16"},
        shared_params={"TASK_STORE": "/mnt/store", "BACKBONE": "bert-tiny"},
    )
    assert models == ["pets"]
    pets = parse((tmp_path / "out" / "pets" / "config.pbtxt").read_text())
    admin = parse((tmp_path / "out" / "pets_admin" / "config.pbtxt").read_text())
    assert [(g.kind, list(g.gpus), g.count) for g in pets.instance_group] == [(KIND_GPU, [0], 3)]
    assert [(g.kind, g.count) for g in admin.instance_group] == [(KIND_CPU, 1)]  # untouched
    for cfg in (pets, admin):
        assert cfg.parameters["TASK_STORE"].string_value == "/mnt/store"
        assert cfg.parameters["BACKBONE"].string_value == "bert-tiny"
    assert pets.parameters["DTYPE"].string_value == "bfloat16"
    assert "DTYPE" not in admin.parameters  # only the shared parameters it already has
    assert (tmp_path / "out" / "pets" / "1").is_dir()
    with pytest.raises(ConfigError, match="is the source repository"):
        render_repository(tmp_path / "out", tmp_path / "out", Placement(), pets_params={},
                          shared_params={})  # fmt: skip


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    smi = tmp_path / "smi.csv"
    smi.write_text(SMI)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    out = tmp_path / "repo"
    argv = ["--src", str(ROOT / "model_repository"), "--out", str(out), "--devices-csv", str(smi)]
    assert main([*argv, "--gpus", "all", "--store", "st", "--memory-budget-mb", "1000"]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == ["pets_gpu0_0", "cuda:0", "pets_gpu0_1", "cuda:0",
                                   "pets_gpu1_0", "cuda:1", "pets_gpu1_1", "cuda:1"]  # fmt: skip
    assert "host GPU 2" in printed.err and "host GPU 3" in printed.err
    cfg = parse((out / "pets" / "config.pbtxt").read_text())
    assert cfg.parameters["DTYPE"].string_value == "float16"  # the GPU default
    assert cfg.parameters["TASK_STORE"].string_value == str(Path("st").resolve())
    assert main([*argv, "--gpus", "2"]) == 2
    assert "no GPU [2] here" in capsys.readouterr().err
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert main([*argv, "--cpu-instances", "3"]) == 0
    cfg = parse((out / "pets" / "config.pbtxt").read_text())
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(KIND_CPU, 3)]
    assert cfg.parameters["DTYPE"].string_value == "auto"  # unchanged on CPU


def _serve(args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    """``build/serve.sh ARGS`` with ``PATH=path``; its argument checks run before any set-up."""
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, str(ROOT / "build" / "serve.sh"), *args],
        env={"PATH": path, "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_mps_needs_gpus() -> None:
    done = _serve(["--mps"], os.environ["PATH"])
    assert done.returncode == 1
    assert "--mps shares GPUs between instances; it needs --gpus" in done.stderr


def test_serve_mps_needs_the_control_binary(tmp_path: Path) -> None:
    # a PATH holding only what the script needs before its checks: no nvidia-cuda-mps-control
    dirname = shutil.which("dirname")
    assert dirname is not None
    (tmp_path / "dirname").symlink_to(dirname)
    done = _serve(["--gpu", "--mps"], str(tmp_path))
    assert done.returncode == 1
    assert "MPS needs nvidia-cuda-mps-control" in done.stderr
    assert "run without MPS" in done.stderr


FAKE_MPS = """#!/bin/sh
# a stand-in nvidia-cuda-mps-control: logs its arguments and stdin; a daemon "runs" while
# $RUNNING exists
log="$(dirname "$0")/calls.log"
if [ "$1" = "-d" ]; then echo start >>"$log"; touch "$RUNNING"; exit 0; fi
cmd=$(cat); echo "$cmd" >>"$log"
case "$cmd" in
  get_server_list) [ -e "$RUNNING" ] ;;
  quit) rm -f "$RUNNING" ;;
esac
"""


@pytest.mark.parametrize("running", [False, True])
def test_mps_helper_starts_or_reuses_the_daemon(tmp_path: Path, running: bool) -> None:
    """``build/mps.sh``: start a daemon when none answers (and stop it), else use it as is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-cuda-mps-control"
    fake.write_text(FAKE_MPS)
    fake.chmod(0o755)
    flag = tmp_path / "running"
    if running:
        flag.touch()
    script = (
        f"source {ROOT / 'build' / 'mps.sh'}; mps_start {tmp_path / 'var'} || exit 9; "
        'echo "started=$MPS_STARTED pipe=$CUDA_MPS_PIPE_DIRECTORY"; mps_stop'
    )
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, "-c", script],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNNING": str(flag)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert f"pipe={tmp_path / 'var' / 'mps'}" in done.stdout
    calls = (bin_dir / "calls.log").read_text().split()
    if running:  # used as it is, left running
        assert "started=0" in done.stdout and calls == ["get_server_list"]
        assert flag.exists()
    else:  # started here, stopped by mps_stop
        assert "started=1" in done.stdout and calls == ["get_server_list", "start", "quit"]
        assert not flag.exists()


@pytest.mark.parametrize("mps", [False, True])
def test_container_entrypoint_runs_and_starts_mps(tmp_path: Path, mps: bool) -> None:
    """``build/container/entrypoint.sh`` is executed directly (its first line must be the
    shebang); with ``PETS_MPS=1`` it starts the daemon through ``build/mps.sh`` before it execs
    tritonserver, whose environment then names the daemon's pipe directory."""
    entry = ROOT / "build" / "container" / "entrypoint.sh"
    assert entry.read_text().startswith("#!/usr/bin/env bash\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "nvidia-cuda-mps-control": FAKE_MPS,
        "python3": '#!/bin/sh\necho python3 "$@" >>"$(dirname "$0")/calls.log"\n',
        "tritonserver": '#!/bin/sh\necho "tritonserver pipe=$CUDA_MPS_PIPE_DIRECTORY"\n',
    }
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    pipe = tmp_path / "pipe"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RUNNING": str(tmp_path / "running"),
        "PETS_SOURCE": str(ROOT),
        "PETS_ADMIN_KEY": "k" * 16,
        "PETS_GPUS": "0",
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
    }
    if mps:
        env["PETS_MPS"] = "1"
    done = subprocess.run([str(entry)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"tritonserver pipe={pipe}" in done.stdout
    calls = (bin_dir / "calls.log").read_text().split("\n")
    assert any(c.startswith("python3 -m pets.placement") for c in calls)
    assert ("start" in calls) == mps and (tmp_path / "running").exists() == mps
    if not mps:
        assert not pipe.exists()


def test_container_entrypoint_mps_needs_gpus(tmp_path: Path) -> None:
    entry = ROOT / "build" / "container" / "entrypoint.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\n")
    (bin_dir / "python3").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PETS_SOURCE": str(ROOT),
        "PETS_ADMIN_KEY": "k" * 16,
        "PETS_GPUS": "none",
        "PETS_MPS": "1",
    }
    done = subprocess.run([str(entry)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "PETS_MPS=1 needs GPU instances" in done.stderr
