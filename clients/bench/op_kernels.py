"""Per-kernel device time of each grouped petops site of ``bench_ops`` (CUDA only).

``bench_ops`` times a whole grouped call; this breaks one call down into the kernels it
launches (``torch.profiler`` CUDA activity, averaged over ``--iters`` calls), so a slow site
shows which launch to work on: e.g. LoRA = output zero-fill + shrink + expand. Prints CSV
(site, kernel, launches per call, microseconds per call) and writes it as ``op_kernels.csv``
to a dated run folder under ``--out`` (``clients/bench/results.py``).

    python -m clients.bench.op_kernels --segments 64
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from clients.bench.bench_ops import Batch, bitfit_ffn, bitfit_ln, lora_like, lora_qv, sparse_site
from clients.bench.results import add_out_argument, start_run

FIELDS = ["segments", "tokens", "site", "kernel", "launches_per_call", "us_per_call"]


def kernel_times(fn, iters: int) -> dict[str, tuple[float, float]]:
    """``{kernel name: (launches per call, device microseconds per call)}`` for ``fn``."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            count[ev.name] += 1
            total[ev.name] += ev.device_time
    return {k: (count[k] / iters, total[k] / iters) for k in total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--segments", default="1,64,256")
    p.add_argument("--lengths", default="16,128")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sites", default=None, help="comma list of sites to run (default all)")
    add_out_argument(p)
    a = p.parse_args()
    out = start_run("op_kernels", a.out, params=vars(a))
    dev, dtype = torch.device("cuda"), torch.float16
    lens = tuple(int(v) for v in a.lengths.split(","))
    g = torch.Generator().manual_seed(0)
    rows = []
    for n_seg in (int(s) for s in a.segments.split(",")):
        b = Batch(n_seg, lens, a.hidden, dev, dtype, g)  # type: ignore[arg-type]
        sites = {
            "lora_r16": lora_like(b, 16, a.hidden, dev, dtype, False)[0],
            "lora_qv_r16_qkv": lora_qv(b, 16, a.hidden, dev, dtype)[0],
            "adapter_r64": lora_like(b, 64, a.hidden, dev, dtype, True)[0],
            "bitfit_bias_gelu": bitfit_ffn(b, a.ffn, dev, dtype)[0],
            "bitfit_bias_res_ln": bitfit_ln(b, a.hidden, dev, dtype)[0],
            "diff_1pct": sparse_site(b, a.hidden, 0.01, False, dev, dtype)[0],
            "mask_5pct": sparse_site(b, a.hidden, 0.05, True, dev, dtype, True)[0],
            "mask_5pct_index": sparse_site(b, a.hidden, 0.05, True, dev, dtype)[0],
        }
        for site, fn in sites.items():
            if a.sites and site not in a.sites.split(","):
                continue
            for name, (n, us) in sorted(
                kernel_times(fn, a.iters).items(), key=lambda kv: -kv[1][1]
            ):
                rows.append(
                    {
                        "segments": n_seg,
                        "tokens": b.tokens,
                        "site": site,
                        "kernel": name[:90],
                        "launches_per_call": round(n, 2),
                        "us_per_call": round(us, 2),
                    }
                )
    w = csv.DictWriter(sys.stdout, FIELDS)
    w.writeheader()
    w.writerows(rows)
    out.write_csv("op_kernels.csv", rows, FIELDS)
    out.finish()


if __name__ == "__main__":
    main()
