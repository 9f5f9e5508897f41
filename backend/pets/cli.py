"""The ``pets`` command line: create, list and remove tasks; build the demo store; profile."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .backbone import load_backbone, resolve_checkpoint
from .errors import PetsError
from .heads import HeadConfig
from .pet import pet_types
from .taskgen import DEFAULT_HPARAMS, random_task
from .taskstore import delete_task, list_tasks, read_task, read_weights, write_task

DEMO_TASKS = ("bitfit", "diff_pruning", "maskbert", "adapter", "lora")


def _head(args: argparse.Namespace) -> HeadConfig:
    if args.head == "classification":
        return HeadConfig("classification", num_labels=args.num_labels)
    return HeadConfig("embedding", pooling=args.pooling, normalize=args.normalize)


def cmd_demo_store(args: argparse.Namespace) -> int:
    w = load_backbone(resolve_checkpoint(args.backbone))
    store = Path(args.store)
    for seed, pet in enumerate(DEMO_TASKS):
        hp = {"bottleneck": 16} if pet == "adapter" else {}
        m, t = random_task(w, f"demo_{pet}", pet, HeadConfig("classification", num_labels=3),
                           seed=seed, hparams=hp)
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
    store = Path(args.store)
    rows = []
    for name in list_tasks(store):
        try:
            m, t = read_task(store / name)
            nbytes = sum(v.numel() * v.element_size() for v in t.values())
            rows.append((name, m.pet_type, json.dumps(m.head.to_json()), f"{nbytes / 1e6:.2f} MB",
                         m.backbone_fingerprint))
        except PetsError as exc:
            rows.append((name, "INVALID", str(exc), "", ""))
    if args.json:
        print(json.dumps([dict(zip(("name", "pet", "head", "size", "backbone"), r, strict=True))
                          for r in rows], indent=2))
    else:
        for r in rows:
            print("\t".join(r))
        print(f"{len(rows)} task(s) in {store}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    delete_task(Path(args.store), args.name)
    print(f"removed {args.name}")
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
    c.add_argument("--pet", required=True,
                   help=f"PET type, or a comma list cycled over --count; one of {sorted(pet_types())}")
    c.add_argument("--backbone", default="default")
    c.add_argument("--hparams", help=f"JSON hyper-parameters; defaults: {DEFAULT_HPARAMS}")
    c.add_argument("--weights", help="safetensors file with the task's tensors")
    c.add_argument("--head", choices=("classification", "embedding"), default="classification")
    c.add_argument("--num-labels", type=int, default=2)
    c.add_argument("--pooling", choices=("cls", "mean"), default="mean")
    c.add_argument("--normalize", action="store_true")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", help="list a task store")
    ls.add_argument("store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    rm = sub.add_parser("remove", help="remove a task from a store")
    rm.add_argument("store")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove)
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
