"""Ahead-of-time compilation of a Triton kernel for compute capability 9.0 (H100 / H200), no GPU needed: the
shared piece of the compile checks (gqa_compile.py, prhs_compile.py)."""

from __future__ import annotations

from collections.abc import Callable

import triton


def compile_sm90(fn, constexprs: dict, pointers: dict, *, divisible: Callable[[str], bool], floats=(), num_warps: int,
                 num_stages: int):
    """fn compiled for sm_90 with the installed Triton: `constexprs` as given, the arguments in `pointers` (name ->
    Triton type) 16-byte aligned, `floats` fp32 and every other argument an i32, specialised as divisible by 16
    where `divisible(name)` says a launch would (the others unspecialised)."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
        if name in pointers or (name not in floats and divisible(name)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    target = triton.backends.compiler.GPUTarget("cuda", 90, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
