"""What the serving path costs beyond a no-op model: pets vs an empty Python model, one server.

Starts one tritonserver holding two models with the same inputs, outputs and batcher:

* ``pets``: the real backend over a store of mixed-type tasks (by default on ``bert-tiny``,
  2 layers of width 32, so compute is negligible and what is measured is the host path:
  decoding, scheduling, staging, responses, metrics);
* ``noop``: a Python-backend model that reads the same inputs and returns zeros;
* ``hf`` (``--hf``): HF ``BertForSequenceClassification`` of the backbone's config (random
  weights, float16 + SDPA on a GPU) in a Python-backend model, padding each execute's
  requests into one batch: the plain deployment backbone-only tasks are compared with
  (``--pet-types none``).

perf_analyzer (gRPC, async) drives both with the same data at each concurrency; the ratio
``pets / noop`` is the share of a bare Python model's rate the serving path keeps. Each row
also gives the engine's mean forward per sequence by PET type (``forward_ms_<type>``, from
the per-task series): at concurrency 1, which types make the latency's tail. With
``--in-process``, once the server has stopped, the same engine (the pets model's parameters,
store and device, the stub's CPU threads) serves the same perf_analyzer data in this process,
``Engine.execute`` on batches of ``min(concurrency, max_batch_size)`` requests, so the row
also gives ``pets_over_inproc``: the share of the engine's own rate the server keeps. Writes
``served_overhead.csv`` and the server log into a dated run folder (clients/bench/results.py).

    python -m clients.bench.served_overhead
    python -m clients.bench.served_overhead --metrics 0 --points 1x16,32x16   # metrics off
    python -m clients.bench.served_overhead --kind GPU --backbone bert-base --tasks 64 \
        --instances 2 --points 1x128,256x64
    python -m clients.bench.served_overhead --kind GPU --backbone bert-base --tasks 64 \
        --pet-types none --hf --instances 2 --points 256x64
    python -m clients.bench.served_overhead --queue-delay-us 0 --points 1x16   # batcher delay
    python -m clients.bench.served_overhead --kind GPU --backbone bert-base --tasks 64 \
        --instances 2 --points 256x64 --in-process      # served / in-process, one run
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.bench.make_perf_data import make
from clients.bench.results import add_out_argument, start_run
from clients.bench.server_breakdown import breakdown, forward_by_group, scrape, scrape_tasks
from clients.pets_client import parse_point, set_queue_delay, start_tritonserver, triton_env
from pets.backbone import load_backbone
from pets.engine import Engine
from pets.heads import HeadConfig
from pets.pet import pet_types
from pets.taskgen import random_task
from pets.taskstore import write_task

ROOT = Path(__file__).resolve().parents[2]

NOOP_MODEL = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Reads every input like pets does and answers zeros: the Python backend's floor."""

    def execute(self, requests):
        out = []
        for request in requests:
            rows = 1
            for tensor in request.inputs():
                rows = tensor.as_numpy().shape[0]
            zeros = np.zeros((rows, 2), np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", zeros)]))
        return out
'''


HF_MODEL = '''\
import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import BertConfig, BertForSequenceClassification

from pets.backbone import hf_config, load_backbone


class TritonPythonModel:
    """HF BertForSequenceClassification over the pets backbone's config (random weights;
    float16 and SDPA on a GPU): each execute pads its requests into one [B, L] batch."""

    def initialize(self, args):
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{{args['model_instance_device_id']}}" if gpu else "cpu")
        if not gpu:
            torch.set_num_threads(1)
        spec = load_backbone({backbone!r}).spec
        cfg = BertConfig(**hf_config(spec), num_labels=2, attn_implementation="sdpa")
        dtype = torch.float16 if gpu else torch.float32
        self.model = BertForSequenceClassification(cfg).to(self.device, dtype).eval()

    def execute(self, requests):
        ids = [pb_utils.get_input_tensor_by_name(r, "INPUT_IDS").as_numpy() for r in requests]
        rows = [a.shape[0] for a in ids]
        width = max(a.shape[1] for a in ids)
        batch = np.zeros((sum(rows), width), np.int64)
        mask = np.zeros((sum(rows), width), np.int64)
        r = 0
        for a in ids:
            batch[r : r + a.shape[0], : a.shape[1]] = a
            mask[r : r + a.shape[0], : a.shape[1]] = 1
            r += a.shape[0]
        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.from_numpy(batch).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
            ).logits.float().cpu().numpy()
        out, r = [], 0
        for n in rows:
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", logits[r : r + n])]))
            r += n
        return out
'''
"""``--hf``: the bare HF model the issue compares backbone-only serving with."""


PROFILED_MODEL = '''\
import cProfile
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("pets_backend_model", {source!r})
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


class TritonPythonModel(_mod.TritonPythonModel):
    """The pets model with cProfile around every execute (the stub's main thread only)."""

    def initialize(self, args):
        super().initialize(args)
        self._profile = cProfile.Profile()

    def execute(self, requests):
        self._profile.enable()
        try:
            return super().execute(requests)
        finally:
            self._profile.disable()

    def finalize(self):
        self._profile.dump_stats(os.path.join({out!r}, f"stub.{{os.getpid()}}.prof"))
        super().finalize()
'''
"""``--profile-stub``: a Python-backend model that runs backend/model.py under cProfile."""


def make_repo(args: argparse.Namespace, root: Path) -> tuple[Path, list[str]]:
    """A model repository with ``pets`` (over a fresh store) and ``noop``; returns the task
    names."""
    weights = load_backbone(args.backbone)
    store = root / "store"
    types = sorted(pet_types()) if args.pet_types == "all" else args.pet_types.split(",")
    names = []
    for i in range(args.tasks):
        pet = types[i % len(types)]
        name = f"t{i}_{pet}"
        m, t = random_task(weights, name, pet, HeadConfig("classification", num_labels=2), seed=i)
        write_task(store, m, t)
        names.append(name)
    repo = root / "repo"
    shutil.copytree(ROOT / "model_repository" / "pets", repo / "pets")
    cfg = repo / "pets" / "config.pbtxt"
    text = cfg.read_text()
    params = {"BACKBONE": args.backbone, "TASK_STORE": str(store), "METRICS": str(args.metrics)}
    for key, value in params.items():
        text, n = re.subn(rf'(key: "{key}" value \{{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        if n != 1:
            raise SystemExit(f"{cfg} has no {key} parameter to rewrite")
    if args.queue_delay_us is not None:  # the batcher of every model in the server
        text = set_queue_delay(text, args.queue_delay_us, str(cfg))
    text = re.sub(
        r"^instance_group .*$",
        f"instance_group [ {{ kind: KIND_{args.kind} count: {args.instances} }} ]",
        text,
        flags=re.M,
    )
    if args.profile_stub:
        (repo / "pets" / "1").mkdir(exist_ok=True)
        source = str(ROOT / "backend" / "model.py")
        (repo / "pets" / "1" / "model.py").write_text(
            PROFILED_MODEL.format(source=source, out=str(root))
        )
        text = re.sub(r'^backend: "pets"', 'backend: "python"', text, flags=re.M)
    cfg.write_text(text)
    head, _, _ = text.partition("# Engine parameters")
    plain = {"noop": NOOP_MODEL}
    if args.hf:
        plain["hf"] = HF_MODEL.format(backbone=args.backbone)
    for model, source in plain.items():
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / "model.py").write_text(source)
        model_cfg = re.sub(r'^name: "pets"', f'name: "{model}"', head, flags=re.M)
        model_cfg = re.sub(r'^backend: "pets"', 'backend: "python"', model_cfg, flags=re.M)
        (repo / model / "config.pbtxt").write_text(model_cfg)
    return repo, names


def make_data(path: Path, names: list[str], length: str, entries: int) -> None:
    """perf_analyzer input data (:func:`clients.bench.make_perf_data.make`): ``entries``
    requests cycling over ``names``, of ``length`` tokens or lengths drawn from ``LO:HI``."""
    path.write_text(json.dumps(make(names, length, entries, seed=0, int32=False)))


def perf(args: argparse.Namespace, env: dict[str, str], url: str, model: str, data: Path,
         c: int, tmp: Path, stability: int = 30) -> dict[str, float]:  # fmt: skip
    """One perf_analyzer measurement (gRPC, async) of ``model`` at concurrency ``c``, over
    ``args.interval_ms`` windows: req/s, p50 and p99 in ms."""
    out = tmp / f"{model}_c{c}.csv"
    cmd = [
        "perf_analyzer", "-m", model, "-i", "grpc", "-u", url, "--async",
        "--input-data", str(data), "--concurrency-range", str(c),
        "--measurement-interval", str(args.interval_ms), "--max-trials", "10",
        "--stability-percentage", str(stability),
        "-f", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"perf_analyzer failed on {model} at concurrency {c}:\n{tail}")
    with out.open() as f:
        row = next(csv.DictReader(f))
    return {
        "req_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
    }


def _write_profile(folder: Path, out: Path) -> None:
    """Merge the instances' cProfile dumps into one report (top functions by own and total
    time)."""
    import io
    import pstats

    dumps = sorted(folder.glob("stub.*.prof"))
    if not dumps:
        print("no stub profile was written (was the model finalized?)", file=sys.stderr)
        return
    buf = io.StringIO()
    stats = pstats.Stats(*map(str, dumps), stream=buf)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    out.write_text(buf.getvalue())


def engine_params(config: str) -> tuple[dict[str, str], int]:
    """A config.pbtxt's ``parameters`` as the backend hands them to the engine, and its
    ``max_batch_size`` (parsed with Triton's own ``ModelConfig`` message)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(config, model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}, cfg.max_batch_size


def data_requests(path: Path) -> list[dict[str, np.ndarray]]:
    """perf_analyzer's input data (:func:`make_data`) as the requests the stub decodes: each
    entry one request, ``TASK`` ``[1, 1]`` bytes and ``INPUT_IDS`` ``[1, L]`` int64."""
    out = []
    for entry in json.loads(path.read_text())["data"]:
        ids = np.asarray(entry["INPUT_IDS"]["content"], np.int64).reshape(1, -1)
        task = np.array([[entry["TASK"][0].encode()]], dtype=object)
        out.append({"TASK": task, "INPUT_IDS": ids})
    return out


def in_process_rate(
    engine: Engine, requests: list[dict[str, np.ndarray]], batch: int, min_s: float = 2.0
) -> dict[str, float]:
    """Requests per second of ``engine.execute`` over ``batch``-request windows of
    ``requests`` (taken in turn, as perf_analyzer cycles its data); 10 warm-up batches (the
    graphs are captured there), then at least 20 batches and ``min_s`` seconds."""
    n = len(requests)
    windows = [[requests[(k * batch + j) % n] for j in range(batch)] for k in range(max(1, n))]
    for k in range(10):
        got = engine.execute(windows[k % len(windows)])
        bad = [g for g in got if not isinstance(g, np.ndarray)]
        if bad:
            raise SystemExit(f"in-process execute answered an error: {bad[0]}")
    done, t0 = 0, time.perf_counter()
    while done < 20 or time.perf_counter() - t0 < min_s:
        engine.execute(windows[done % len(windows)])
        done += 1
    seconds = time.perf_counter() - t0
    return {"req_per_s": batch * done / seconds, "batch_ms": 1e3 * seconds / done}


def stub_threads(log: Path) -> int | None:
    """The CPU threads a CPU instance's engine ran with, from its ready line."""
    found = re.findall(r"ready on cpu with (\d+) CPU threads", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def check_engine_source(log: Path) -> None:
    """Refuse to measure an engine other than this tree's: the stub imports ``pets`` through
    the virtualenv (it ignores PYTHONPATH), so a benchmark run from another checkout would
    serve the installed tree's engine (docs/contributing.md)."""
    want = str((ROOT / "backend" / "pets").resolve())
    seen = set(re.findall(r"engine from (\S+?),", log.read_text(errors="replace")))
    if seen and seen != {want}:
        raise SystemExit(
            f"the server's pets engine comes from {sorted(seen)}, not this tree's {want}; "
            "point the virtualenv's pets install at this tree (or give it its own "
            "virtualenv) before comparing builds"
        )


CAPTURE = re.compile(r"CUDA graphs: captured a forward in ([0-9.]+) ms")


def captures_since(log: Path, offset: int) -> tuple[int, float]:
    """CUDA-graph captures the server logged after byte ``offset`` of ``log``: their count
    and their total ms."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    ms = [float(v) for v in CAPTURE.findall(text)]
    return len(ms), round(sum(ms), 1)


def compare_in_process(
    args: argparse.Namespace,
    repo: Path,
    tmp: Path,
    points: list[tuple[int, str]],
    rows: list[dict[str, Any]],
    log: Path,
) -> None:
    """Add ``inproc_*`` and ``pets_over_inproc`` to each served row: the pets model's engine
    (its config's parameters, store and device) in this process, on the same data."""
    config = (repo / "pets" / "config.pbtxt").read_text()
    device = "cuda:0" if args.kind == "GPU" else "cpu"
    if device == "cpu":
        threads = stub_threads(log)
        if threads is None:
            raise SystemExit(f"{log} has no 'ready on cpu with N CPU threads' line to copy")
        torch.set_num_threads(threads)
    params, max_batch = engine_params(config)
    engine = Engine.from_parameters(params, model_dir=str(repo), device=device)
    try:
        for row, (c, length) in zip(rows, points, strict=True):
            batch = min(c, max_batch)
            got = in_process_rate(engine, data_requests(tmp / f"data{length}.json"), batch)
            row["inproc_batch"] = batch
            row.update({f"inproc_{k}": round(v, 3) for k, v in got.items()})
            row["pets_over_inproc"] = round(row["pets_req_per_s"] / got["req_per_s"], 3)
            print(
                json.dumps(
                    {k: row[k] for k in ("concurrency", "length") if k in row}
                    | {k: v for k, v in row.items() if "inproc" in k}
                ),
                flush=True,
            )
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="bert-tiny")
    ap.add_argument("--tasks", type=int, default=14, help="tasks in the store")
    ap.add_argument(
        "--pet-types", default="all", help="PET types the tasks cycle over, comma-separated"
    )
    ap.add_argument(
        "--points",
        default="32x16",
        help="comma-separated CONCURRENCYxLENGTH points (tokens per request), e.g. 1x128,256x64; "
        "a length LO:HI draws each request's length uniformly (1x16:128)",
    )
    ap.add_argument("--metrics", type=int, default=1, help="the pets model's METRICS")
    ap.add_argument(
        "--hf",
        action="store_true",
        help="also serve HF BertForSequenceClassification of the backbone's config (hf_*)",
    )
    ap.add_argument("--kind", default="CPU", choices=("CPU", "GPU"))
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--interval-ms", type=int, default=4000)
    ap.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="the dynamic batcher's max_queue_delay_microseconds for every model "
        "(default: the pets config's)",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="after the server stops, time the same engine and data in this process "
        "(inproc_*, pets_over_inproc)",
    )
    ap.add_argument(
        "--profile-stub",
        action="store_true",
        help="run the pets model under cProfile; writes stub_profile.txt (slows it down)",
    )
    add_out_argument(ap)
    args = ap.parse_args(argv)
    run = start_run("served_overhead", args.out, params=vars(args))
    env = triton_env(ROOT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pets-served-") as td:
        tmp = Path(td)
        repo, names = make_repo(args, tmp)
        points = [parse_point(p) for p in args.points.split(",")]
        for length in {n for _, n in points}:
            make_data(tmp / f"data{length}.json", names, length, 256)
        shutil.copy2(ROOT / "backend" / "model.py", Path(env["PETS_TRITON_BACKENDS"]) / "pets")
        server = start_tritonserver(repo, run.path("tritonserver.log"), env)
        try:
            check_engine_source(run.path("tritonserver.log"))
            metrics_url, url = server.metrics_url, server.grpc_url
            for c, length in points:
                data = tmp / f"data{length}.json"
                got = {"noop": perf(args, env, url, "noop", data, c, tmp)}
                if args.hf:
                    got["hf"] = perf(args, env, url, "hf", data, c, tmp)
                before = scrape(metrics_url, "pets")
                before_tasks = scrape_tasks(metrics_url, "pets")
                log_at = run.path("tritonserver.log").stat().st_size
                got["pets"] = perf(args, env, url, "pets", data, c, tmp)
                n_cap, cap_ms = captures_since(run.path("tritonserver.log"), log_at)
                time.sleep(1.5)  # the per-task series are pushed once a second
                try:
                    split = breakdown(before, scrape(metrics_url, "pets"))
                except SystemExit as exc:  # no executes counted: report the rates alone
                    print(f"no breakdown at concurrency {c}: {exc}", file=sys.stderr)
                    split = {"requests_per_execute": float("nan"), "stub_ms": float("nan")}
                # Forward time per sequence by PET type (the task names end in the type): at
                # concurrency 1 it says which types make the latency's tail.
                by_type = forward_by_group(
                    before_tasks,
                    scrape_tasks(metrics_url, "pets"),
                    {n: n.split("_", 1)[1] for n in names},
                )
                row: dict[str, Any] = {
                    "concurrency": c,
                    "length": int(length) if length.isdigit() else length,
                    "metrics": args.metrics,
                }
                for m, vals in got.items():
                    row.update({f"{m}_{k}": round(v, 3) for k, v in vals.items()})
                # Where a pets execute's time goes (Triton's execute vs the engine's forward).
                row.update({f"exec_{k}": round(v, 3) for k, v in split.items()})
                row["exec_stub_us_per_request"] = round(
                    1e3 * split["stub_ms"] / split["requests_per_execute"], 1
                )
                row["graph_captures"], row["graph_capture_ms"] = n_cap, cap_ms
                row.update({f"forward_ms_{t}": round(v, 3) for t, v in by_type.items()})
                row["pets_over_noop"] = round(
                    got["pets"]["req_per_s"] / got["noop"]["req_per_s"], 3
                )
                if args.hf:
                    row["pets_over_hf"] = round(
                        got["pets"]["req_per_s"] / got["hf"]["req_per_s"], 3
                    )
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.stop()
            if args.profile_stub:
                _write_profile(tmp, run.path("stub_profile.txt"))
        if args.in_process:
            compare_in_process(args, repo, tmp, points, rows, run.path("tritonserver.log"))
    run.write_csv("served_overhead.csv", rows)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
