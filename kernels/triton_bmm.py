"""Batched matmul C[b] = A[b] @ B[b] in Triton, differentiable to any order.

Operands are read through their strides, so a transposed operand (`w.transpose(1, 2)`) or a
weight shared by the batch (`w.unsqueeze(0).expand(B, ...)`, batch stride 0) costs no copy. The
backward is two more calls of the same Function (dA = dC Bᵀ, dB = Aᵀ dC), so under
`create_graph=True` autograd records them like any op and every order of derivative is again a
batched matmul. This is the building block of the fast-weight SwiGLU (kernels/triton_swiglu.py).

    bmm(a [Bt, M, K], b [Bt, K, N]) -> [Bt, M, N]   (same dtype, accumulated in float32/float64)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.triton_utils import acc_dtype, block_size, dot_precision, empty


@triton.jit
def bmm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] + k0 < K) & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + batch * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def bmm_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    batch, M, K = a.shape
    N = b.shape[2]
    c = empty((batch, M, N), a.dtype, a.device)
    if interpreting():  # the interpreter's cost is programs x iterations: one big tile
        bm, bn, bk, warps = block_size(M, 16, 128), block_size(N, 16, 128), block_size(K, 16, 128), 4
    else:
        bk = block_size(K, 16, 64 if a.element_size() < 4 else 32)
        bm, bn = block_size(M, 16, 128), block_size(N, 16, 128)
        warps = 8 if bm * bn >= 128 * 128 else 4
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), batch)
    bmm_kernel[grid](
        a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
        ACC=acc_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    return c


class BatchedMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return bmm_forward(a, b)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        da = bmm(dc, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        db = bmm(a.transpose(1, 2), dc) if ctx.needs_input_grad[1] else None
        return da, db


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [Bt, M, K] @ b [Bt, K, N]; both of one dtype, any strides."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"bmm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    if a.dtype != b.dtype:
        raise ValueError(f"bmm: dtypes {a.dtype} and {b.dtype} differ")
    return BatchedMatmulFunction.apply(a, b)
