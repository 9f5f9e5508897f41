"""Canary for the `pets` model: a tiny real request every N seconds.

Triton 2.51 neither restarts a crashed Python stub nor marks its model unready
(`v2/health/ready` stays 200 while every request fails with "Stub process ... is not
healthy"), so readiness probes cannot see it. This canary can:

    python clients/canary.py --url 127.0.0.1:8000 --interval 10          # watch forever
    python clients/canary.py --count 1                                   # one probe (cron)
    python clients/canary.py --reload --admin-key KEY                    # and recover

It probes a known task (``--task``, else the first task of the pets_admin ``list`` action,
which needs ``--token`` / $PETS_ADMIN_TOKEN). Each probe prints one line: ``HEALTHY ...`` or
``UNHEALTHY ...: <error>``. Exit status: 0 healthy at the end, 1 unhealthy (after
``--failures`` consecutive failed probes), 2 usage error or a failed reload. With
``--reload`` an unhealthy model is reloaded through the model-control API (``load_model``;
the server must run with ``--model-control-mode=explicit``, and ``--admin-key`` unlocks the
restricted model-repository API; the served config is re-sent with a new RELOAD_NONCE
parameter, which forces new stub processes), then probed again: ``RECOVERED ...`` or exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from clients.pets_client import DEFAULT_URL, MODEL, admin_inputs, build_inputs, client_module

PROBE_IDS = np.array([[101, 7592, 2088, 102]], dtype=np.int64)  # [CLS] hello world [SEP]


def first_task(client: Any, mod: Any, admin_model: str, token: str) -> str:
    """The first registered task, from the pets_admin model's ``list`` action."""
    raw = client.infer(admin_model, admin_inputs(mod, token, "list")).as_numpy("RESULT")[0]
    tasks = [t["name"] for t in json.loads(raw)["tasks"] if t.get("pet") != "INVALID"]
    if not tasks:
        raise RuntimeError("the task store has no tasks; register one or pass --task")
    return str(tasks[0])


def probe(client: Any, mod: Any, model: str, task: str) -> float:
    """One request; returns its latency in ms, raises on any failure."""
    t0 = time.perf_counter()
    out = client.infer(model, build_inputs(mod, task, ids=PROBE_IDS)).as_numpy("OUTPUT")
    ms = (time.perf_counter() - t0) * 1e3
    if out is None or out.shape[0] != 1 or not np.isfinite(out).all():
        raise RuntimeError(
            f"bad OUTPUT {None if out is None else out.shape}; expected [1, D] finite values"
        )
    return ms


def reload(client: Any, model: str, admin_key: str | None, wait_s: float) -> float:
    """A full reload (new stubs), then wait until the model is ready again.

    A plain ``load_model(model)`` is a no-op while the model's files are unchanged (Triton
    2.51 checks their timestamps), so the served config is sent back with a new
    ``parameters.RELOAD_NONCE``: a changed parameter forces new instances (the engine ignores
    unknown parameters). The old instances serve until the new ones are ready.
    """
    headers = {"admin-key": admin_key} if admin_key else None
    t0 = time.monotonic()
    cfg = client.get_model_config(model, headers=headers)
    if not isinstance(cfg, dict):  # gRPC returns a protobuf message
        cfg = client.get_model_config(model, headers=headers, as_json=True)
    cfg = cfg.get("config", cfg)
    cfg.setdefault("parameters", {})["RELOAD_NONCE"] = {"string_value": str(time.time_ns())}
    client.load_model(model, headers=headers, config=json.dumps(cfg))
    while not client.is_model_ready(model):
        if time.monotonic() - t0 > wait_s:
            raise TimeoutError(f"{model} not ready {wait_s:.0f} s after load_model")
        time.sleep(0.2)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--url", help="server address (default 127.0.0.1:8000 / :8001)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--task", help="task to probe (default: first task of the admin list)")
    ap.add_argument("--admin-model", default="pets_admin")
    ap.add_argument(
        "--token",
        default=os.environ.get("PETS_ADMIN_TOKEN"),
        help="pets_admin token for --task discovery (default $PETS_ADMIN_TOKEN)",
    )
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between probes")
    ap.add_argument("--count", type=int, default=0, help="probes to send (0 = forever)")
    ap.add_argument(
        "--failures",
        type=int,
        default=1,
        help="consecutive failed probes that make the model UNHEALTHY",
    )
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    ap.add_argument(
        "--reload",
        action="store_true",
        help="reload the model (model-control API) when it is unhealthy",
    )
    ap.add_argument(
        "--admin-key",
        default=os.environ.get("PETS_ADMIN_KEY"),
        help="admin-key header for the restricted model-repository API",
    )
    ap.add_argument("--reload-wait", type=float, default=300.0)
    args = ap.parse_args(argv)

    mod = client_module(args.protocol)
    url = args.url or DEFAULT_URL[args.protocol]
    if args.protocol == "http":
        client = mod.InferenceServerClient(
            url, connection_timeout=args.timeout, network_timeout=args.timeout
        )
    else:
        client = mod.InferenceServerClient(url)
    task = args.task
    if task is None:
        if not args.token:
            print(
                "canary: give --task, or --token/$PETS_ADMIN_TOKEN to ask pets_admin",
                file=sys.stderr,
            )
            return 2
        try:
            task = first_task(client, mod, args.admin_model, args.token)
        except Exception as exc:
            print(f"UNHEALTHY {args.admin_model}: task discovery failed: {exc}", flush=True)
            return 1
    failed, i = 0, 0
    while args.count <= 0 or i < args.count:
        i += 1
        try:
            ms = probe(client, mod, args.model, task)
            failed = 0
            print(f"HEALTHY {args.model} task={task} {ms:.1f} ms", flush=True)
        except Exception as exc:
            failed += 1
            msg = " ".join(str(exc).split())[:300]
            print(f"UNHEALTHY {args.model} task={task}: {msg}", flush=True)
            if failed >= args.failures:
                if not args.reload:
                    return 1
                print(f"RELOADING {args.model} (load_model)", flush=True)
                try:
                    secs = reload(client, args.model, args.admin_key, args.reload_wait)
                    ms = probe(client, mod, args.model, task)
                except Exception as exc2:
                    print(
                        f"UNHEALTHY {args.model}: reload failed: "
                        f"{' '.join(str(exc2).split())[:300]}",
                        flush=True,
                    )
                    return 2
                failed = 0
                print(
                    f"RECOVERED {args.model} after reload in {secs:.1f} s; probe {ms:.1f} ms",
                    flush=True,
                )
        if args.count <= 0 or i < args.count:
            time.sleep(args.interval)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
