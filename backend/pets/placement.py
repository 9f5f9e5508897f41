"""Where the `pets` instances run: GPUs of a host -> ``instance_group``, and a served copy of
the model repository.

``build/serve.sh`` and the container entry point (``build/container/entrypoint.sh``) call
``python -m pets.placement``; everything here is pure text and list work (no torch, no
CUDA), so it is tested on a CPU with fake device lists.

Devices come from ``nvidia-smi --query-gpu=index,uuid,name,memory.total
--format=csv,noheader,nounits`` (all GPUs of the host, whatever ``CUDA_VISIBLE_DEVICES``
says) and are narrowed and renumbered by ``CUDA_VISIBLE_DEVICES`` the way the CUDA runtime
does it, because Triton's ``gpus: [ k ]`` is a CUDA ordinal of the server's process.

Each GPU gets its own instance group, named ``<model>_gpu<k>``, so every instance has a
unique name (``pets_gpu1_0``, ...). With one group listing several GPUs Triton gives the
instances on different GPUs the same name (``pets_0_0`` on GPU 0 and on GPU 1), which
would make them indistinguishable in logs and metrics.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,uuid,name,memory.total",
    "--format=csv,noheader,nounits",
]
# Two instances per GPU: the measured deployment default (docs/performance.md: each instance
# overlaps its stub's per-request work with the other's forwards).
DEFAULT_INSTANCES_PER_GPU = 2
_GROUP_LINE = re.compile(r"^instance_group\s*\[.*\]\s*$", re.M)
_BACKEND_LINE = re.compile(r'^backend:\s*"([^"]+)"', re.M)


@dataclass(frozen=True)
class Gpu:
    """One GPU as the serving process sees it.

    ``index`` is its CUDA ordinal after ``CUDA_VISIBLE_DEVICES`` (what Triton's ``gpus``
    lists); ``host_index`` is nvidia-smi's index.
    """

    index: int
    host_index: int
    uuid: str
    name: str
    memory_mib: int

    def describe(self) -> str:
        host = "" if self.host_index == self.index else f", host GPU {self.host_index}"
        return f"GPU {self.index} ({self.name}, {self.memory_mib} MiB{host})"


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from the CSV of :data:`SMI_QUERY` (one ``index, uuid, name, MiB`` line each)."""
    gpus = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit() or not parts[3].isdigit():
            raise ConfigError(
                f"nvidia-smi line {n} is {line!r}; expected 'index, uuid, name, memory MiB' "
                f"(the output of {' '.join(SMI_QUERY)})"
            )
        idx, uuid, name, mib = parts
        gpus.append(Gpu(int(idx), int(idx), uuid, name, int(mib)))
    return gpus


def visible_gpus(gpus: Sequence[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs a process with this ``CUDA_VISIBLE_DEVICES`` sees, renumbered 0..k-1.

    Like the CUDA runtime: unset means all; entries are host indices or UUIDs (a unique
    prefix such as ``GPU-8a1f`` is enough); the list stops at the first entry that names no
    GPU (so ``""`` and ``"-1"`` hide every GPU). A GPU named twice is an error in CUDA
    (no device at all); here it is a :class:`ConfigError` that says so.
    """
    if cuda_visible_devices is None:
        return [Gpu(k, g.host_index, g.uuid, g.name, g.memory_mib) for k, g in enumerate(gpus)]
    out: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if entry.isdigit():
            found = [g for g in gpus if g.host_index == int(entry)]
        elif entry.startswith(("GPU-", "MIG-")):
            found = [g for g in gpus if g.uuid.startswith(entry)]
        else:
            found = []
        if len(found) != 1:  # unknown, or an ambiguous UUID prefix: enumeration stops
            break
        if any(g.host_index == found[0].host_index for g in out):
            raise ConfigError(
                f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} names GPU "
                f"{found[0].host_index} twice; list each GPU once"
            )
        g = found[0]
        out.append(Gpu(len(out), g.host_index, g.uuid, g.name, g.memory_mib))
    return out


def select_gpus(spec: str, visible: Sequence[Gpu]) -> list[Gpu]:
    """``"all"`` or a comma list of CUDA ordinals (``"0,2"``) -> those GPUs, in order."""
    if not visible:
        raise ConfigError(
            f"--gpus {spec}: this process sees no GPU (nvidia-smi listed none, or "
            "CUDA_VISIBLE_DEVICES hides them all); serve on CPU without --gpus"
        )
    if spec.strip() == "all":
        return list(visible)
    try:
        wanted = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(
            f"--gpus {spec!r}: expected 'all' or a comma list of GPU ordinals such as '0,1'"
        ) from None
    have = {g.index: g for g in visible}
    bad = [k for k in wanted if k not in have]
    if bad:
        seen = ", ".join(g.describe() for g in visible)
        raise ConfigError(
            f"--gpus {spec!r}: no GPU {bad} here; this process sees {seen} (ordinals after "
            "CUDA_VISIBLE_DEVICES); pick from those or use --gpus all"
        )
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"--gpus {spec!r} lists a GPU twice; list each GPU once")
    return [have[k] for k in wanted]


@dataclass(frozen=True)
class Placement:
    """Instances of one model: ``per_gpu`` on each of ``gpus``, or ``cpu`` CPU instances."""

    gpus: tuple[Gpu, ...] = ()
    per_gpu: int = DEFAULT_INSTANCES_PER_GPU
    cpu: int = 1

    def __post_init__(self) -> None:
        n = self.per_gpu if self.gpus else self.cpu
        if n < 1:
            raise ConfigError(f"{n} instances per device; expected at least 1")

    @property
    def instances(self) -> int:
        return self.per_gpu * len(self.gpus) if self.gpus else self.cpu

    def instance_group(self, model: str) -> str:
        """The ``instance_group [...]`` block of ``model``'s config.pbtxt."""
        if not self.gpus:
            return f"instance_group [ {{ kind: KIND_CPU count: {self.cpu} }} ]"
        groups = ",\n".join(
            f'  {{ name: "{model}_gpu{g.index}" kind: KIND_GPU count: {self.per_gpu} '
            f"gpus: [ {g.index} ] }}"
            for g in self.gpus
        )
        return f"instance_group [\n{groups}\n]"

    def instance_names(self, model: str) -> list[tuple[str, str]]:
        """(Triton instance name, torch device) of every instance. Triton 2.51 names the
        i-th instance of a group ``<group>_<i>``, also when the group has one (checked by
        tests/e2e/test_scaleout.py); the default group name is ``<model>_<group index>``."""
        if not self.gpus:
            return [(f"{model}_0_{i}", "cpu") for i in range(self.cpu)]
        return [
            (f"{model}_gpu{g.index}_{i}", f"cuda:{g.index}")
            for g in self.gpus
            for i in range(self.per_gpu)
        ]

    def check_budget(self, memory_budget_mb: int) -> None:
        """Refuse a per-instance task budget whose copies cannot fit one GPU."""
        if not self.gpus or memory_budget_mb <= 0:
            return
        for g in self.gpus:
            need = memory_budget_mb * self.per_gpu
            if need >= g.memory_mib:
                raise ConfigError(
                    f"MEMORY_BUDGET_MB={memory_budget_mb} x {self.per_gpu} instances = "
                    f"{need} MiB of tasks on {g.describe()}, which has {g.memory_mib} MiB in "
                    "all (the backbone copies and activations need room too); lower "
                    "--memory-budget-mb or --instances-per-gpu (pets capacity sizes it)"
                )

    def describe(self) -> str:
        if not self.gpus:
            return f"{self.cpu} CPU instance(s)"
        return f"{self.per_gpu} instance(s) on each of " + ", ".join(
            g.describe() for g in self.gpus
        )


def render_config(text: str, *, group: str | None, params: Mapping[str, str]) -> str:
    """``text`` (a config.pbtxt) with its one-line ``instance_group`` replaced by ``group``
    (unless None) and each of ``params`` set (added at the end when absent)."""
    if group is not None:
        text, n = _GROUP_LINE.subn(lambda _: group, text)
        if n != 1:
            raise ConfigError(
                f"found {n} one-line 'instance_group [ ... ]' lines in the config; expected "
                "exactly one (keep the source repository's instance_group on one line)"
            )
    for key, value in params.items():
        if '"' in value or "\n" in value:
            raise ConfigError(f"parameter {key}={value!r} holds a quote or newline; rename it")
        pattern = re.compile(
            rf'(key:\s*"{re.escape(key)}"\s*value\s*\{{\s*string_value:\s*)"[^"]*"'
        )
        text, n = pattern.subn(_replacer(value), text)
        if n == 0:
            text = text.rstrip("\n") + (
                f'\nparameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
            )
    return text


def _replacer(value: str) -> Callable[[re.Match[str]], str]:
    """A ``re.sub`` callback that keeps group 1 and writes ``"value"`` (taken literally)."""
    return lambda m: f'{m.group(1)}"{value}"'


def backend_of(config_text: str) -> str | None:
    m = _BACKEND_LINE.search(config_text)
    return m.group(1) if m else None


def render_repository(
    src: Path,
    dest: Path,
    placement: Placement,
    *,
    pets_params: Mapping[str, str],
    shared_params: Mapping[str, str],
) -> list[str]:
    """Copy every model of ``src`` into ``dest`` (replaced) and rewrite the configs.

    Models whose config says ``backend: "pets"`` get ``placement``'s instance groups and
    ``pets_params`` + ``shared_params``; the others (``pets_admin``) only the
    ``shared_params`` they already carry (TASK_STORE and BACKBONE must match the pets
    model's). Returns the names of the ``pets`` models.
    """
    models = sorted(p.parent for p in src.glob("*/config.pbtxt"))
    if not models:
        raise ConfigError(f"no */config.pbtxt under {src}; expected a Triton model repository")
    if dest.resolve() == src.resolve():
        raise ConfigError(f"--out {dest} is the source repository; write the copy elsewhere")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    pets_models = []
    for model in models:
        shutil.copytree(model, dest / model.name)
        cfg = dest / model.name / "config.pbtxt"
        text = cfg.read_text()
        if backend_of(text) == "pets":
            pets_models.append(model.name)
            text = render_config(
                text,
                group=placement.instance_group(model.name),
                params={**pets_params, **shared_params},
            )
        else:
            present = {k: v for k, v in shared_params.items() if f'key: "{k}"' in text}
            text = render_config(text, group=None, params=present)
        cfg.write_text(text)
    if not pets_models:
        raise ConfigError(f'no model in {src} says backend: "pets"; nothing to place')
    return pets_models


def discover_gpus(csv_file: str | None) -> list[Gpu]:
    """The host's GPUs from ``csv_file`` (``-`` is stdin) or from running nvidia-smi."""
    if csv_file == "-":
        return parse_nvidia_smi(sys.stdin.read())
    if csv_file:
        return parse_nvidia_smi(Path(csv_file).read_text())
    try:
        out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(
            f"cannot list the GPUs with `{' '.join(SMI_QUERY)}` ({exc}); install the NVIDIA "
            "driver tools, or serve on CPU without --gpus"
        ) from None
    return parse_nvidia_smi(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pets.placement",
        description="Write a served copy of a model repository with the pets instances "
        "placed on the chosen GPUs (or CPU) and the given parameters.",
    )
    ap.add_argument("--src", default="model_repository", help="source model repository")
    ap.add_argument("--out", required=True, help="folder for the generated copy (replaced)")
    ap.add_argument("--gpus", help="'all' or CUDA ordinals '0,1,...' (default: CPU)")
    ap.add_argument("--instances-per-gpu", type=int, default=DEFAULT_INSTANCES_PER_GPU)
    ap.add_argument("--cpu-instances", type=int, default=1, help="CPU instances without --gpus")
    ap.add_argument("--store", help="TASK_STORE of every model (absolute path)")
    ap.add_argument("--backbone", help="BACKBONE of every model")
    ap.add_argument("--dtype", help="DTYPE of the pets models (default float16 on GPUs)")
    ap.add_argument("--memory-budget-mb", type=int, help="MEMORY_BUDGET_MB per instance")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another parameter of the pets models (repeatable)")  # fmt: skip
    ap.add_argument(
        "--devices-csv", help="nvidia-smi CSV to use instead of running it ('-': stdin)"
    )
    args = ap.parse_args(argv)
    try:
        if args.gpus:
            visible = visible_gpus(
                discover_gpus(args.devices_csv), os.environ.get("CUDA_VISIBLE_DEVICES")
            )
            placement = Placement(
                gpus=tuple(select_gpus(args.gpus, visible)), per_gpu=args.instances_per_gpu
            )
        else:
            placement = Placement(cpu=args.cpu_instances)
        pets_params: dict[str, str] = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            pets_params[key] = value
        dtype = args.dtype or ("float16" if placement.gpus else None)
        if dtype:
            pets_params["DTYPE"] = dtype
        if args.memory_budget_mb is not None:
            placement.check_budget(args.memory_budget_mb)
            pets_params["MEMORY_BUDGET_MB"] = str(args.memory_budget_mb)
        shared = {}
        if args.store:
            shared["TASK_STORE"] = str(Path(args.store).resolve())
        if args.backbone:
            shared["BACKBONE"] = args.backbone
        models = render_repository(
            Path(args.src), Path(args.out), placement, pets_params=pets_params,
            shared_params=shared,
        )  # fmt: skip
    except ConfigError as exc:
        print(f"placement: error: {exc}", file=sys.stderr)
        return 2
    print(f"placement: {', '.join(models)}: {placement.describe()}", file=sys.stderr)
    for name, device in placement.instance_names(models[0]):
        print(f"{name} {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
