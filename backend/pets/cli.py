"""The ``pets`` command line: create, list, remove and import tasks; build the demo store;
measure capacity."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .backbone import load_backbone, resolve_checkpoint
from .capacity import measure
from .engine import DTYPES
from .errors import PetsError
from .heads import HEAD_KINDS, OUTPUTS, HeadConfig
from .importers import ImportResult, finetuned_types, import_finetuned, import_peft, peft_types
from .pet import pet_types
from .taskgen import default_options, demo_tasks, demo_types, random_task
from .taskstore import delete_task, list_tasks, read_task, read_weights, write_task
from .validate import validate_task

DEMO_TASKS = demo_types()  # the PET types with a demo task (their demo_options)


def _head(args: argparse.Namespace) -> HeadConfig:
    if args.head == "embedding":
        obj = {"type": "embedding", "pooling": args.pooling, "normalize": args.normalize}
    else:
        obj = {"type": args.head, "num_labels": args.num_labels, "output": args.output}
    return HeadConfig.parse({**obj, "pairs": args.pairs})  # checked as a manifest is


def cmd_demo_store(args: argparse.Namespace) -> int:
    w = load_backbone(resolve_checkpoint(args.backbone))
    store = Path(args.store)
    for m, t in demo_tasks(w):
        write_task(store, m, t)
    print(f"demo store {store}: {', '.join(list_tasks(store))}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    w = load_backbone(resolve_checkpoint(args.backbone))
    hparams = json.loads(args.hparams) if args.hparams else {}
    head = _head(args)
    store = Path(args.store)
    names = [args.name] if args.count == 1 else [f"{args.name}{i}" for i in range(args.count)]
    types = args.pet.split(",")
    for i, name in enumerate(names):
        pet = types[i % len(types)]
        manifest, tensors = random_task(w, name, pet, head, seed=args.seed + i, hparams=hparams)
        if args.weights:  # real weights: PET tensors from a safetensors file
            tensors = read_weights(Path(args.weights))
        write_task(store, manifest, tensors)
    print(f"wrote {len(names)} task(s) to {store}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Every store entry; one that the server would refuse is INVALID with its reason
    (links, unreadable files; with ``--check`` also the full validation against
    ``--backbone``: fingerprint, PET tensors, head)."""
    store = Path(args.store)
    weights = load_backbone(resolve_checkpoint(args.backbone)) if args.check else None
    rows = []
    for name in list_tasks(store):
        try:
            m, t = read_task(store / name)
            if weights is not None:
                validate_task(weights, m, t)
            nbytes = sum(v.numel() * v.element_size() for v in t.values())
            rows.append(
                {
                    "name": name,
                    "pet": m.pet_type,
                    "head": json.dumps(m.head.to_json()),
                    "size": f"{nbytes / 1e6:.2f} MB",
                    "backbone": m.backbone_fingerprint,
                }
            )
        except PetsError as exc:
            reason = str(exc).replace(str(store), "<store>")
            rows.append({"name": name, "pet": "INVALID", "head": reason, "size": "",
                         "backbone": "", "error": reason})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print("\t".join(r[k] for k in ("name", "pet", "head", "size", "backbone")))
        bad = sum(r["pet"] == "INVALID" for r in rows)
        print(
            f"{len(rows)} task(s) in {store}, {bad} INVALID"
            + ("" if args.check else " (--check also validates against --backbone)")
        )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    delete_task(Path(args.store), args.name)
    print(f"removed {args.name}")
    return 0


def _opt_head(args: argparse.Namespace) -> HeadConfig | None:
    if args.head is None:
        return None
    if args.head != "embedding":  # num_labels 0: the checkpoint's classifier decides
        return HeadConfig(args.head, num_labels=0, output=args.output)
    return HeadConfig("embedding", pooling=args.pooling, normalize=args.normalize)


def _report_import(res: ImportResult) -> int:
    for w in res.warnings:
        print(f"pets: warning: {w}", file=sys.stderr)
    m = res.manifest
    print(
        f"imported {m.name} ({m.pet_type}, {len(res.tensors)} tensors, "
        f"{res.nbytes() / 1e6:.2f} MB, head {json.dumps(m.head.to_json())}) -> {res.path}"
    )
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    w = load_backbone(resolve_checkpoint(args.backbone))
    return _report_import(
        import_peft(Path(args.store), args.name, Path(args.adapter_dir), w, _opt_head(args))
    )


def cmd_import_finetuned(args: argparse.Namespace) -> int:
    w = load_backbone(resolve_checkpoint(args.backbone))
    return _report_import(
        import_finetuned(
            Path(args.store),
            args.name,
            Path(args.checkpoint_dir),
            w,
            args.pet,
            args.density,
            _opt_head(args),
        )
    )


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_task  # onnx and onnxruntime load only for this command

    w = load_backbone(resolve_checkpoint(args.backbone))
    manifest, tensors = read_task(Path(args.store) / args.task)
    rep = export_task(
        w,
        args.backbone,
        manifest,
        tensors,
        Path(args.out),
        opset=args.opset,
        dtype=args.dtype,
        dynamic=args.dynamic,
        batch=args.batch,
        seq_len=args.seq_len,
        pairs=args.pairs,
        check=args.check,
        exporter=args.exporter,
    )
    checked = (
        f"ONNX Runtime vs engine max-abs {rep.max_abs:.2e} (<= {rep.tolerance:g})"
        if args.check
        else "not checked (--no-check)"
    )
    print(f"exported {manifest.name} -> {rep.path} (opset {rep.opset}, {rep.dtype}); {checked}")
    if rep.config_path is not None:
        print(f"Triton onnxruntime config: {rep.config_path}")
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    w = load_backbone(resolve_checkpoint(args.backbone))
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    )
    budget = None if args.budget_gb is None else int(args.budget_gb * (1 << 30))
    hparams = json.loads(args.hparams) if args.hparams else None
    report = measure(
        w,
        args.device,
        dtype,
        budget_bytes=budget,
        reserve_bytes=int(args.reserve_gb * (1 << 30)),
        pets=args.pet.split(",") if args.pet else None,
        hparams=hparams,
        samples=args.samples,
    )
    if not args.json:
        print(report.table())
    print(json.dumps(report.to_json(), indent=None if not args.json else 2))
    return 0


def _add_import_head(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--backbone", default="default", help="the serving backbone (checked)")
    sp.add_argument(
        "--head",
        choices=HEAD_KINDS,
        default=None,
        help="the head (default: from the classifier and task_type/problem_type; embedding "
        "without a classifier)",
    )
    sp.add_argument("--output", choices=OUTPUTS, default="logits")
    sp.add_argument("--pooling", choices=("cls", "mean"), default="mean")
    sp.add_argument("--normalize", action="store_true")


def cmd_profile(args: argparse.Namespace) -> int:
    import tempfile

    from .engine import Engine
    from .profiling import EngineProbe
    from .scheduling import profile_cli

    engine = Engine.from_parameters(
        {
            "BACKBONE": args.backbone,
            "TASK_STORE": tempfile.mkdtemp(prefix="pets-profile-"),
            "DTYPE": args.dtype,
            "OPS": args.ops,
        },
        device=args.device,
    )
    probe = EngineProbe(engine)
    name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    return profile_cli(
        args,
        probe.measure,
        device=name,
        dtype=str(engine.dtype).removeprefix("torch."),
        backbone_fingerprint=engine.spec.fingerprint,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from .metrics import scrape, status_table

    try:
        text = scrape(args.url, timeout=args.timeout)
    except OSError as exc:
        print(
            f"pets: error: cannot read metrics from {args.url} ({exc}); is tritonserver "
            "running with --allow-metrics (default) on that --metrics-port?",
            file=sys.stderr,
        )
        return 2
    print(status_table(text, model=args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pets", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo-store", help="write one demo task of each PET type")
    d.add_argument("store")
    d.add_argument("--backbone", default="default")
    d.set_defaults(func=cmd_demo_store)

    c = sub.add_parser("create", help="create task(s): random init, or PET tensors from --weights")
    c.add_argument("store")
    c.add_argument("name", help="task name (a prefix when --count > 1)")
    c.add_argument(
        "--pet",
        required=True,
        help=f"PET type, or a comma list cycled over --count; one of {sorted(pet_types())}",
    )
    c.add_argument("--backbone", default="default")
    c.add_argument("--hparams", help=f"JSON hyper-parameters; defaults: {default_options()}")
    c.add_argument("--weights", help="safetensors file with the task's tensors")
    c.add_argument("--head", choices=HEAD_KINDS, default="classification")
    c.add_argument("--num-labels", type=int, default=2)
    c.add_argument(
        "--output", choices=OUTPUTS, default="logits", help="raw logits (HF's) or activated"
    )
    c.add_argument("--pairs", action="store_true", help="a sentence-pair task (cross-encoder)")
    c.add_argument("--pooling", choices=("cls", "mean"), default="mean")
    c.add_argument("--normalize", action="store_true")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", help="list a task store")
    ls.add_argument("store")
    ls.add_argument("--json", action="store_true")
    ls.add_argument(
        "--check",
        action="store_true",
        help="validate every task fully against --backbone, as the server does",
    )
    ls.add_argument("--backbone", default="default", help="the serving backbone (with --check)")
    ls.set_defaults(func=cmd_list)

    pr = sub.add_parser("profile", help="measure the scheduler's cost model on this device")
    pr.add_argument("--backbone", default="default")
    pr.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    pr.add_argument("--dtype", default="auto")
    pr.add_argument("--ops", default="auto")
    from .scheduling import add_profile_arguments

    add_profile_arguments(pr)
    pr.set_defaults(func=cmd_profile)

    rm = sub.add_parser("remove", help="remove a task from a store")
    rm.add_argument("store")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove)

    ip = sub.add_parser(
        "import-peft",
        help=f"import a PEFT {'/'.join(sorted(peft_types()))} adapter folder (safetensors)",
    )
    ip.add_argument("store")
    ip.add_argument("name")
    ip.add_argument(
        "adapter_dir", help="folder with adapter_config.json + adapter_model.safetensors"
    )
    _add_import_head(ip)
    ip.set_defaults(func=cmd_import_peft)

    fi = sub.add_parser(
        "import-finetuned",
        help=f"import a full fine-tuned BERT checkpoint as {' or '.join(finetuned_types())}",
    )
    fi.add_argument("store")
    fi.add_argument("name")
    fi.add_argument("checkpoint_dir", help="save_pretrained folder (config.json + safetensors)")
    fi.add_argument("--as", dest="pet", choices=finetuned_types(), required=True)
    fi.add_argument(
        "--density",
        type=float,
        default=0.01,
        help="diff_pruning: share of each weight matrix kept (largest |W_ft - W|)",
    )
    _add_import_head(fi)
    fi.set_defaults(func=cmd_import_finetuned)

    ex = sub.add_parser(
        "export-onnx",
        help="export one task (backbone + PET + head) as a standalone ONNX model, checked "
        "against the engine, with a config.pbtxt for Triton's onnxruntime backend",
    )
    ex.add_argument("store")
    ex.add_argument("task")
    ex.add_argument("out", help="the .onnx file (e.g. model_repository/my_task/1/model.onnx)")
    ex.add_argument("--backbone", default="default")
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    ex.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dynamic batch and sequence axes (default); --no-dynamic fixes [--batch, --seq-len]",
    )
    ex.add_argument("--batch", type=int, default=2)
    ex.add_argument("--seq-len", type=int, default=16)
    ex.add_argument(
        "--pairs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add a token_type_ids input (default: the head's 'pairs' flag)",
    )
    ex.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    ex.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare ONNX Runtime with the engine (default on)",
    )
    ex.set_defaults(func=cmd_export_onnx)

    cp = sub.add_parser("capacity", help="measure per-task memory and how many tasks fit")
    cp.add_argument("--backbone", default="default")
    cp.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    cp.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    cp.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="memory for tasks (default: free device memory)",
    )
    cp.add_argument(
        "--reserve-gb",
        type=float,
        default=0.0,
        help="keep this much free for activations and the allocator",
    )
    cp.add_argument("--pet", help="comma list of PET types (default: all)")
    cp.add_argument("--hparams", help="JSON {pet: {hparam: value}} overriding the defaults")
    cp.add_argument("--samples", type=int, default=4, help="tasks registered per PET type")
    cp.add_argument("--json", action="store_true", help="print only the JSON report")
    cp.set_defaults(func=cmd_capacity)

    st = sub.add_parser(
        "status",
        help="per-task requests, errors, tokens and compute time, "
        "and residency, from a server's metrics port",
    )
    st.add_argument("--url", default="127.0.0.1:8002", help="metrics host:port (or URL)")
    st.add_argument("--model", default="pets")
    st.add_argument("--timeout", type=float, default=5.0)
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return int(args.func(args))
    except PetsError as exc:
        print(f"pets: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
