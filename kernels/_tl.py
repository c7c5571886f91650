"""Device helpers shared by the kernels."""
import os

import triton
import triton.language as tl

from ._common import interpreting


# Round fp32 -> bf16 by hand only under the interpreter (below); on the GPU the hardware cast
# rounds to nearest even already, and the four integer ops per element cost the GEMV's norm
# prologue time. KOALA_CAST_BY_HAND=1 keeps the hand rounding on the GPU too (the two give the same
# bits for every finite and infinite value; bench/linear_bench.py times both).
_CAST_BY_HAND = tl.constexpr(interpreting() or os.environ.get("KOALA_CAST_BY_HAND", "0") not in ("", "0"))


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """x (fp32) -> dtype, rounding to nearest even.

    Why not plain x.to(dtype) everywhere: Triton's interpreter (3.9, the CI path) truncates
    fp32 -> bf16, an error of up to 1 ulp (0.8% relative) where the GPU and PyTorch round to
    nearest; the tests would then see the kernel twice as far from the exact answer as PyTorch is.
    Under the interpreter the bits are rounded by hand first (about 4 integer ops per element),
    which makes the cast exact there; compiled for the GPU, x.to(dtype) is the hardware's
    round-to-nearest-even conversion, the same bits (NaN payloads aside)."""
    if _CAST_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = bits & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def sigmoid(x):
    """fp32 sigmoid from exp(-|x|) only: never overflows (exp(88.8) is inf in fp32, and the
    interpreter warns on it)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST (set by the host only under TRITON_INTERPRET=1): Triton 3.9's interpreter multiplies
    bf16 operands as their raw uint16 bit patterns (errors of 1e10); converting both to fp32 first
    is exact for bf16/fp16 and gives what the GPU's bf16 MMA with fp32 accumulation gives."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def pdl_wait(USE_GDC: tl.constexpr):
    """Programmatic Dependent Launch (kernels/_common.py): wait until the previous grid in the
    stream has finished and its writes are visible, then let the next grid start launching. Call
    it before any read of activations and before any store; only constant weights may be loaded
    before it. A no-op when USE_GDC is off (the interpreter, pre-sm_90 devices, KOALA_PDL=0)."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
