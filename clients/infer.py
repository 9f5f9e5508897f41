"""Send one request to the `pets` model and print its OUTPUT.

python clients/infer.py --task demo_lora --text "a great movie"
python clients/infer.py --protocol grpc --task demo_bitfit --ids 101,2023,2003,102
python clients/infer.py --task demo_adapter --text "first" --text "second"   # 2 rows
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from clients.pets_client import DEFAULT_URL, MODEL, build_inputs, client_module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="host:port (default 127.0.0.1:8000 http / :8001 grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--task", required=True, help="task name, e.g. demo_lora")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="input text (repeat for more rows)")
    src.add_argument("--ids", help="comma-separated token ids, e.g. 101,7592,102")
    p.add_argument("--int32", action="store_true", help="send ids as INPUT_IDS_INT32")
    p.add_argument("--json", action="store_true", help="print the output as JSON")
    a = p.parse_args(argv)

    mod = client_module(a.protocol)
    ids = None
    if a.ids is not None:
        try:
            ids = np.array([int(x) for x in a.ids.split(",") if x.strip()], dtype=np.int64)
        except ValueError:
            p.error(f"--ids {a.ids!r} must be comma-separated integers, e.g. 101,7592,102")
    inputs = build_inputs(mod, a.task, texts=a.text, ids=ids, int32=a.int32)
    client = mod.InferenceServerClient(a.url or DEFAULT_URL[a.protocol])
    try:
        result = client.infer(a.model, inputs)
    except Exception as exc:  # InferenceServerException: print the server's message
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = result.as_numpy("OUTPUT")
    if a.json:
        print(json.dumps({"task": a.task, "shape": list(out.shape), "output": out.tolist()}))
    else:
        np.set_printoptions(precision=5, suppress=True, linewidth=100)
        print(f"OUTPUT {out.dtype} {list(out.shape)}\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
