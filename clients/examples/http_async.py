"""Asynchronous HTTP (asyncio): 10 concurrent requests over all demo tasks."""

import asyncio

import numpy as np
import tritonclient.http.aio as httpclient

TASKS = ["demo_bitfit", "demo_diff_pruning", "demo_maskbert", "demo_adapter", "demo_lora"]


async def one(client: httpclient.InferenceServerClient, name: str, n: int) -> np.ndarray:
    ids = np.array([[101] + [2000 + n] * n + [102]], dtype=np.int64)
    task = httpclient.InferInput("TASK", [1, 1], "BYTES")
    task.set_data_from_numpy(np.array([[name]], dtype=object))
    inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    return (await client.infer("pets", [task, inp])).as_numpy("OUTPUT")


async def main() -> None:
    client = httpclient.InferenceServerClient("127.0.0.1:8000")
    try:
        outs = await asyncio.gather(*(one(client, TASKS[i % 5], i + 1) for i in range(10)))
        for i, out in enumerate(outs):
            print(TASKS[i % 5], out.shape, out[0, :4])
    finally:
        await client.close()


asyncio.run(main())
