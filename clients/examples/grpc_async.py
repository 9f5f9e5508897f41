"""Asynchronous gRPC (asyncio): concurrent requests batch together on the server."""

import asyncio

import numpy as np
import tritonclient.grpc.aio as grpcclient

TASKS = ["demo_bitfit", "demo_diff_pruning", "demo_maskbert", "demo_adapter", "demo_lora"]


async def one(client: grpcclient.InferenceServerClient, name: str, text: str) -> np.ndarray:
    task = grpcclient.InferInput("TASK", [1, 1], "BYTES")
    task.set_data_from_numpy(np.array([[name]], dtype=object))
    inp = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[text]], dtype=object))
    return (await client.infer("pets", [task, inp])).as_numpy("OUTPUT")


async def main() -> None:
    async with grpcclient.InferenceServerClient("127.0.0.1:8001") as client:
        jobs = [one(client, TASKS[i % 5], f"request number {i}") for i in range(20)]
        for i, out in enumerate(await asyncio.gather(*jobs)):
            print(TASKS[i % 5], out.shape, out[0, :4])


asyncio.run(main())
