"""Compile every kernel variant the launchers use for an NVIDIA GPU, without a GPU.

Triton's CPU interpreter runs the kernels' arithmetic but not the compiler, which is stricter (a
value defined inside a loop is not visible after it, block shapes must be powers of two, types must
agree across branches). This tool runs each launcher on small CPU tensors of the full-size widths
with the jitted kernel swapped for a recorder, so the argument types and compile-time constants are
exactly the ones a real launch would use, then compiles each recorded launch for the target with
Triton's bundled ptxas and reports registers and spills (ptxas -v).

    python -m flashportrait.kernels.compile_check            # sm_90 (H100/H200)
    python -m flashportrait.kernels.compile_check --arch 80

Must run without TRITON_INTERPRET (the interpreter replaces the compiler). Exit status 1 when a
variant fails to compile or spills registers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# The DiT's full-size widths: blocks are sized from them.
DIM, HEADS, FFN = 5120, 40, 13824


@dataclass(frozen=True)
class Launch:
    name: str
    fn: object  # the JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int


class _Recorder:
    """Stands in for a JITFunction: `recorder[grid](*args, **kwargs)` records the launch under the
    variant name currently in `label[0]` instead of launching."""

    def __init__(self, fn, label: list[str], launches: list[Launch]):
        self.fn, self.label, self.launches = fn, label, launches

    def __getitem__(self, grid) -> Callable[..., None]:
        return self._record

    def _record(self, *args, num_warps: int = 4, **constexprs) -> None:
        from triton.runtime.jit import mangle_type

        names = self.fn.arg_names
        signature = {n: mangle_type(a) for n, a in zip(names, args, strict=False)}
        signature.update({n: "constexpr" for n in constexprs})
        self.launches.append(Launch(self.label[0], self.fn, signature, dict(constexprs), num_warps))


def record_launches() -> list[Launch]:
    """Every kernel variant the public API launches at the DiT's widths (bf16/fp16/fp32 where the API
    takes them), recorded from the real launchers."""
    # By module path: the package exports a function named like the rmsnorm_rope module.
    fp8 = importlib.import_module("flashportrait.kernels.fp8")
    modulation = importlib.import_module("flashportrait.kernels.modulation")
    rmsnorm_rope = importlib.import_module("flashportrait.kernels.rmsnorm_rope")

    launches: list[Launch] = []
    originals = {
        (rmsnorm_rope, "_rmsnorm_rope_kernel"): rmsnorm_rope._rmsnorm_rope_kernel,
        (modulation, "_residual_norm_kernel"): modulation._residual_norm_kernel,
        (fp8, "_quantize_kernel"): fp8._quantize_kernel,
    }
    label = [""]
    try:
        for (module, attr), fn in originals.items():
            setattr(module, attr, _Recorder(fn, label, launches))

        def named(name: str, call: Callable[[], object]) -> None:
            label[0] = name
            call()

        x32 = torch.zeros(1, 2, DIM)
        y16 = torch.zeros(1, 2, DIM, dtype=torch.bfloat16)
        vec = torch.zeros(1, 6, DIM).chunk(6, dim=1)[0]
        w = torch.ones(DIM)
        cos = torch.ones(2, 1, DIM // HEADS // 2)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            q = torch.zeros(1, 2, DIM, dtype=dtype)
            named(
                f"rmsnorm_rope {dtype}", lambda q=q: rmsnorm_rope.rmsnorm_rope_triton(q, w, cos, cos, HEADS)
            )
            named(
                f"layernorm_modulate -> {dtype}",
                lambda dtype=dtype: modulation.residual_norm_triton(
                    x32, None, None, vec, vec, out_dtype=dtype
                ),
            )
        norm = modulation.residual_norm_triton
        named("layernorm_modulate -> fp8", lambda: norm(x32, None, None, vec, vec, fp8=True))
        named("gated_residual", lambda: norm(x32, y16, vec, norm=False))
        named("gated_residual bf16 stream", lambda: norm(y16, y16, vec, norm=False))
        named("residual + affine LN", lambda: norm(x32, y16, vec, weight=w, bias=w))
        named("residual + LN + modulation", lambda: norm(x32, y16, None, vec, vec))
        named("residual + LN + modulation -> fp8", lambda: norm(x32, y16, None, vec, vec, fp8=True))
        for k in (DIM, FFN):
            for dtype in (torch.bfloat16, torch.float32):
                a = torch.zeros(2, k, dtype=dtype)
                named(f"quantize_fp8 K={k} {dtype}", lambda a=a: fp8.quantize_fp8_triton(a))
            a = torch.zeros(2, k, dtype=torch.bfloat16)
            named(f"gelu + quantize_fp8 K={k}", lambda a=a: fp8.quantize_fp8_triton(a, "gelu_tanh"))
    finally:
        for (module, attr), fn in originals.items():
            setattr(module, attr, fn)
    return launches


def compile_launch(launch: Launch, arch: int) -> tuple[int, int]:
    """Compile for sm_<arch>; returns (registers per thread, spill bytes) from ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.fn, launch.signature, constexprs=launch.constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        report = subprocess.run(
            [str(ptxas), f"-arch={target}", "-v", str(ptx), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))
    return registers, spills


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    failed = 0
    print(f"| kernel variant (sm_{args.arch}) | warps | registers | spill bytes | ok |")
    print("|---|---|---|---|---|")
    for launch in record_launches():
        try:
            registers, spills = compile_launch(launch, args.arch)
        except Exception as exc:  # report every variant, then fail
            failed += 1
            message = (str(exc).strip().splitlines() or [""])[-1][:200]
            print(f"| {launch.name} | {launch.num_warps} | - | - | ERROR {type(exc).__name__}: {message} |")
            continue
        failed += spills > 0
        verdict = "SPILLS" if spills else "yes"
        print(f"| {launch.name} | {launch.num_warps} | {registers} | {spills} | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
