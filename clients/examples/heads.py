"""Tasks of different heads served together: token classification (NER), a cross-encoder on
sentence pairs (NLI), multi-label tags, a regression score and an embedding.

Create the tasks first (random weights: the numbers mean nothing, the shapes do)::

    pets create var/demo_store ner --pet lora --head token_classification --num-labels 5
    pets create var/demo_store nli --pet adapter --num-labels 3 --output probabilities --pairs
    pets create var/demo_store tags --pet ia3 --head multi_label --num-labels 3 \\
        --output probabilities
    pets create var/demo_store sts --pet bitfit --head regression --num-labels 1 --pairs
    pets create var/demo_store emb --pet diff_pruning --head embedding --normalize

then, with the server up (`make serve`): ``python clients/examples/heads.py [--protocol grpc]``.

1. One request, two tasks of different heads (``nli``, ``tags``; both 3 wide), rows with and
   without a second text (an empty TEXT_PAIR row is a single text): OUTPUT ``[k, 3]``.
2. Five requests sent at once, one per head; the server runs them in one forward. A
   token-classification request returns ``[k, L, C]``: one row per token of its text.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import numpy as np


def inputs(mod: Any, tasks: list[str], texts: list[str], pairs: list[str] | None = None) -> list:
    """TASK and TEXT (and TEXT_PAIR) InferInputs, one row per text."""
    out = []
    for name, rows in (("TASK", tasks), ("TEXT", texts), ("TEXT_PAIR", pairs)):
        if rows is not None:
            t = mod.InferInput(name, [len(rows), 1], "BYTES")
            t.set_data_from_numpy(np.array([r.encode() for r in rows], dtype=object)[:, None])
            out.append(t)
    return out


async def main(protocol: str, url: str) -> None:
    if protocol == "http":
        import tritonclient.http.aio as mod
    else:
        import tritonclient.grpc.aio as mod
    client = mod.InferenceServerClient(url)
    try:
        # 1. One request, tasks of two heads, a pair row and a single-text row.
        req = inputs(
            mod,
            ["nli", "tags"],
            ["A man plays a guitar on stage.", "great battery, awful screen"],
            ["A musician is performing.", ""],
        )
        out = (await client.infer("pets", req)).as_numpy("OUTPUT")
        print(f"one request, nli + tags: OUTPUT {out.shape}")
        print(f"  nli probabilities {np.round(out[0], 3)}, tags sigmoids {np.round(out[1], 3)}")

        # 2. One request per head, all in flight at once.
        calls = {
            "ner": inputs(mod, ["ner"], ["Ada Lovelace was born in London."]),
            "nli": inputs(mod, ["nli"], ["It is raining."], ["The street is wet."]),
            "tags": inputs(mod, ["tags"], ["fast delivery, broken box"]),
            "sts": inputs(mod, ["sts"], ["A cat sleeps."], ["A kitten is napping."]),
            "emb": inputs(mod, ["emb"], ["shared backbone, many tasks"]),
        }
        results = await asyncio.gather(*(client.infer("pets", r) for r in calls.values()))
        for name, res in zip(calls, results, strict=True):
            arr = res.as_numpy("OUTPUT")
            print(f"{name:5s} OUTPUT {arr.shape}: {np.round(arr.reshape(-1)[:4], 3)}")
    finally:
        await client.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--url", help="default 127.0.0.1:8000 (http) or 127.0.0.1:8001 (grpc)")
    args = ap.parse_args()
    default = "127.0.0.1:8000" if args.protocol == "http" else "127.0.0.1:8001"
    asyncio.run(main(args.protocol, args.url or default))
