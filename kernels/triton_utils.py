"""Helpers shared by the Triton kernel modules (this one imports Triton; kernels/backend.py does not)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting

# Tests set this so every buffer a kernel is meant to fill starts as NaN: an element a kernel
# forgets to write then shows up as a NaN in the result instead of as stale memory.
POISON_OUTPUTS = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that a kernel writes in full."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def acc_dtype(dtype: torch.dtype):
    """Accumulate in float32, or in float64 for float64 inputs (gradient checks)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision. It only matters for float32 inputs, which use TF32 where torch's
    own matmuls would; 16-bit inputs keep Triton's default (tensor cores either way)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def block_size(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """t viewed as [rows, elements] with contiguous elements; the row stride may be 0 (an
    expanded tensor), so a weight shared by the batch is read, not copied."""
    flat = t.reshape(t.shape[0], -1)
    return flat if flat.stride(1) == 1 or flat.shape[1] == 1 else flat.contiguous()
