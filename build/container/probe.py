"""Readiness/liveness probe of a pets server, run inside its container (an exec probe).

Triton 2.51 answers ``v2/health/ready`` with 200 after a `pets` stub process died, and does
not restart it (docs/operations.md), so this probe checks three things and exits 1 on the
first that fails:

1. ``v2/health/ready`` answers 200;
2. every instance the entry point placed (``--instances``, written by ``pets.placement``:
   one ``<instance name> <device>`` line each) has a live ``triton_python_backend_stub``
   of the `pets` model (its command line names the instance);
3. one real request is answered: for ``--task``, else the first task of ``pets_admin list``
   (``$PETS_ADMIN_TOKEN``) when the store has one, else a request for a task that does not
   exist, which a live stub refuses with "unknown task" (an empty store stays ready, so tasks
   can be registered through the Service).

Prints one line, ``HEALTHY ...`` or ``UNHEALTHY ...: <reason>``. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from collections import Counter
from pathlib import Path

NO_SUCH_TASK = "probe-no-such-task"


def live_stubs(
    model: str, server_pid: int | None = None, proc: Path = Path("/proc")
) -> Counter[str]:
    """Instance name -> number of live ``triton_python_backend_stub`` processes of ``model``
    (children of ``server_pid`` only, when given; a container has one server anyway).

    A stub's arguments are ``<model dir>/<version>/model.py <shm region> ... <instance>
    <backend dir>``: the model is the folder above the version, the instance the
    second-to-last argument (Triton 2.51's python backend). A killed stub that the server
    has not reaped yet is a zombie and does not count.
    """
    out: Counter[str] = Counter()
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            raw = (p / "cmdline").read_bytes().split(b"\0")
            state, ppid = (p / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw if a]
        if state == "Z" or len(argv) < 3 or not argv[0].endswith("triton_python_backend_stub"):
            continue
        if server_pid is not None and int(ppid) != server_pid:
            continue
        if Path(argv[1]).parent.parent.name == model:
            out[argv[-2]] += 1
    return out


def expected_instances(path: Path) -> Counter[str]:
    names: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        if line.strip():
            names[line.split()[0]] += 1
    return names


def check(args: argparse.Namespace) -> str:
    """Raises RuntimeError naming the first failed check; returns what was checked."""
    try:
        urllib.request.urlopen(f"http://{args.url}/v2/health/ready", timeout=args.timeout)
    except OSError as exc:
        raise RuntimeError(f"v2/health/ready: {exc}") from None
    if args.instances:
        want = expected_instances(Path(args.instances))
        have = live_stubs(args.model, args.server_pid)
        missing = sorted((want - have).elements())
        if missing:
            raise RuntimeError(
                f"no live stub process for instance(s) {missing} of {args.model!r} "
                f"(live: {sorted(have.elements())}); Triton 2.51 does not restart a dead stub"
            )
    from tritonclient.utils import InferenceServerException

    from clients.canary import PROBE_IDS, first_task, probe
    from clients.pets_client import build_inputs, client_module

    mod = client_module("http")
    client = mod.InferenceServerClient(
        args.url, connection_timeout=args.timeout, network_timeout=args.timeout
    )
    task = args.task
    if task is None and args.token:
        try:
            task = first_task(client, mod, "pets_admin", args.token)
        except RuntimeError:  # no task in the store yet
            task = None
    if task is not None:
        ms = probe(client, mod, args.model, task)
        return f"task={task} {ms:.1f} ms"
    try:
        client.infer(args.model, build_inputs(mod, NO_SUCH_TASK, ids=PROBE_IDS))
    except InferenceServerException as exc:
        if "unknown task" in str(exc):
            return "no task to probe; the stub refused an unknown task as it should"
        raise
    raise RuntimeError(f"a request for the unregistered task {NO_SUCH_TASK!r} was answered")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port of the server")
    ap.add_argument("--model", default="pets")
    ap.add_argument("--instances", help="file of '<instance> <device>' lines to find alive")
    ap.add_argument("--server-pid", type=int, help="count only this tritonserver's stubs")
    ap.add_argument("--task", help="task to probe (default: the first registered one)")
    ap.add_argument("--token", default=os.environ.get("PETS_ADMIN_TOKEN"))
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        what = check(args)
    except Exception as exc:
        print(f"UNHEALTHY {args.model}: {' '.join(str(exc).split())[:400]}", flush=True)
        return 1
    print(f"HEALTHY {args.model}: {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
