"""Ahead-of-time compilation of petops' Triton kernels for a GPU this machine need not have.

The tests compile each tiling for sm_90 on the CPU box and read the result: that the Hopper
matrix instructions (wgmma) are there and that no register spills, without a GPU.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
"""Triton's names of the element types the kernels take."""


def compile_kernel(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    aligned: list[str],
    num_warps: int,
    num_stages: int,
    arch: int = 90,
) -> dict[str, Any]:
    """Compile the ``@triton.jit`` function ``fn`` for compute capability ``arch``.

    Args:
        fn: the kernel.
        signature: Triton type of every runtime argument (``"*fp16"``, ``"i32"``, ...), in
            the kernel's order; the constexpr arguments follow.
        constexprs: the constexpr arguments' values, in the kernel's order.
        aligned: arguments declared 16-divisible, as Triton's launcher specialises pointers
            and sizes of bert-sized tensors, so the code is what a GPU run of them compiles.
        num_warps, num_stages: the launch options.
        arch: e.g. 90 for sm_90.

    Returns:
        Triton's stages by name (``ttgir``, ``ptx``: text; ``cubin``: bytes).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = signature | {name: "constexpr" for name in constexprs}
    names = list(full)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return dict(triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local (spill) bytes of a compiled kernel, read by the cuobjdump
    that ships with Triton (``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}``)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups()), strict=True))
