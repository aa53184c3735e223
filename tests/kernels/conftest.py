"""Where the kernel tests run: `cpu` through Triton's interpreter, `cuda` compiled; each skips cleanly.

Triton decides between interpreter and compiler when it is imported (its own library functions such
as `tl.sum` are decorated then), so on a machine without CUDA the interpreter flag is set here, at
collection, before anything imports triton. It changes nothing for other tests: the kernels'
automatic backend never uses the interpreter, only an explicit `backend="triton"` on a CPU tensor
does. With CUDA present the kernels are compiled for the GPU and the CPU variants skip.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from flashportrait.kernels.api import triton_importable

_TRITON_ALREADY_IMPORTED = "triton" in sys.modules
if not torch.cuda.is_available() and not _TRITON_ALREADY_IMPORTED:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    if not triton_importable():
        pytest.skip("the triton package is not installed")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
    elif torch.cuda.is_available():
        pytest.skip("CUDA is present: the kernels are compiled for the GPU in this process, not interpreted")
    elif _TRITON_ALREADY_IMPORTED or os.environ.get("TRITON_INTERPRET") in (None, "", "0"):
        pytest.skip("triton was imported before the interpreter flag could be set (TRITON_INTERPRET=1)")
    return torch.device(request.param)
