"""Triton helpers shared by the op families.

Both work around the Triton interpreter (``TRITON_INTERPRET=1``, how CI checks kernels
on CPU) and compile to plain ``tl.dot`` / ``.to`` on a GPU.
"""
import triton
import triton.language as tl

from f2l_kernels._backend import interpret_mode

_INTERPRET = interpret_mode()
INTERPRET: tl.constexpr = tl.constexpr(_INTERPRET)


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr):
    # The interpreter's tl.dot on bf16/fp16 operands is not reliable: give it fp32
    # operands holding the same values (the products are exact either way).
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def cast_to(v, DTYPE: tl.constexpr):
    # The interpreter truncates fp32 -> bf16; round to nearest even by hand there so that
    # CPU tests see the rounding the GPU does.
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)
