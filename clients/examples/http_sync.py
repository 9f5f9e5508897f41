"""Synchronous HTTP: one request with text, one with token ids (2 rows)."""

import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8000")

task = httpclient.InferInput("TASK", [1, 1], "BYTES")
task.set_data_from_numpy(np.array([["demo_lora"]], dtype=object))
text = httpclient.InferInput("TEXT", [1, 1], "BYTES")
text.set_data_from_numpy(np.array([["serving many tasks on one BERT"]], dtype=object))
print("text:", client.infer("pets", [task, text]).as_numpy("OUTPUT"))

ids = np.array([[101, 7592, 2088, 102], [101, 2204, 3185, 102]], dtype=np.int64)  # 2 rows
task2 = httpclient.InferInput("TASK", [2, 1], "BYTES")
task2.set_data_from_numpy(np.array([["demo_bitfit"], ["demo_adapter"]], dtype=object))
inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
inp.set_data_from_numpy(ids)
print("ids:", client.infer("pets", [task2, inp]).as_numpy("OUTPUT"))
