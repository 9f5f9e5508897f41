"""Synchronous gRPC, with INT32 token ids (INPUT_IDS_INT32) and error handling."""

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

client = grpcclient.InferenceServerClient("127.0.0.1:8001")


def infer(task_name: str, ids: list[int]) -> np.ndarray:
    task = grpcclient.InferInput("TASK", [1, 1], "BYTES")
    task.set_data_from_numpy(np.array([[task_name]], dtype=object))
    inp = grpcclient.InferInput("INPUT_IDS_INT32", [1, len(ids)], "INT32")
    inp.set_data_from_numpy(np.array([ids], dtype=np.int32))
    return client.infer("pets", [task, inp]).as_numpy("OUTPUT")


print("demo_maskbert:", infer("demo_maskbert", [101, 7592, 2088, 102]))
try:
    infer("no_such_task", [101, 102])
except InferenceServerException as exc:  # per-request INVALID_ARG
    print("refused:", exc.status(), exc.message())
