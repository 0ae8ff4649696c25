"""Rotary position embedding in Triton, one launch per order of differentiation.

    x [..., T, D];  cos, sin [T, D]  ->  out [..., T, D] (contiguous), in the promoted dtype of x,
    cos and sin;  with x1, x2 = x[..., :D/2], x[..., D/2:] (and c1, c2, s1, s2 the same halves):

        out1 = x1 ∘ c1 - x2 ∘ s1,   out2 = x2 ∘ c2 + x1 ∘ s2        (kernels/rope.py's apply_rope)

RoPE is linear in x, so its backward is its transpose, another rotation of the same shape:

        dx1 = g1 ∘ c1 + g2 ∘ s2,    dx2 = g2 ∘ c2 - g1 ∘ s1

(with RoPE's tables, whose halves are equal, that is the rotation by -θ: the same op with sin
negated). One kernel computes either map (`transpose`), and `RopeFunction`'s backward is the
Function itself with `transpose` flipped, so every order of differentiation is one launch and the
graph of any backward leads back to the same Function. TTT-E2E's suffix differentiates its
attention twice, so q and k are rotated three times per step.

cos and sin are constants made from positions: they get no gradient, and `rope` refuses tables
that require one. x is read through its strides (the [B, H, T, D] view of a [B, T, H, D]
projection is not copied); leading dims past the third are flattened, which copies only where a
view cannot express them. The host computes nothing from tensor values (no syncs), so the op can
be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import interpreting
from kernels.triton_utils import acc_dtype, block_size, empty


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, HALF,
    stride_xa, stride_xh, stride_xt, stride_xd,
    stride_ct, stride_cd, stride_st, stride_sd,
    TRANSPOSE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_T rows (positions) of one [T, D] slice x[a, h], both halves."""
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    row = (pid // n_t).to(tl.int64)  # index of the [T, D] slice, over a and h
    a, h = row // H, row % H
    offs_t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < HALF)
    x_ptrs = x_ptr + a * stride_xa + h * stride_xh + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd
    c_ptrs = cos_ptr + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd
    s_ptrs = sin_ptr + offs_t[:, None] * stride_st + offs_d[None, :] * stride_sd
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptrs + HALF * stride_xd, mask=mask, other=0.0).to(ACC)
    c1 = tl.load(c_ptrs, mask=mask, other=0.0).to(ACC)
    c2 = tl.load(c_ptrs + HALF * stride_cd, mask=mask, other=0.0).to(ACC)
    s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(ACC)
    s2 = tl.load(s_ptrs + HALF * stride_sd, mask=mask, other=0.0).to(ACC)
    if TRANSPOSE:
        out1 = x1 * c1 + x2 * s2
        out2 = x2 * c2 - x1 * s1
    else:
        out1 = x1 * c1 - x2 * s1
        out2 = x2 * c2 + x1 * s2
    out_ptrs = out_ptr + row * T * 2 * HALF + offs_t[:, None] * 2 * HALF + offs_d[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptrs, out1.to(dtype), mask=mask)
    tl.store(out_ptrs + HALF, out2.to(dtype), mask=mask)


def _table(t: torch.Tensor, T: int, D: int) -> torch.Tensor:
    """cos or sin as a [T, D] view (leading dims of size 1 dropped, size-1 dims broadcast)."""
    if t.dim() < 1 or any(s != 1 for s in t.shape[:-2]):
        raise ValueError(f"rope: cos/sin of shape {tuple(t.shape)} is not a [T, D] table")
    return (t.reshape(t.shape[-2:]) if t.dim() >= 2 else t.unsqueeze(0)).expand(T, D)


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """The rotation of x (or its transpose), written contiguous in out_dtype."""
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"rope: x of shape {tuple(x.shape)} needs [..., T, D] with D even")
    T, D = x.shape[-2:]
    cos, sin = _table(cos, T, D), _table(sin, T, D)
    out = empty(x.shape, out_dtype, x.device)
    if out.numel() == 0:
        return out
    x4 = x.reshape(-1, x.shape[-3], T, D) if x.dim() >= 3 else x.view(1, 1, T, D)
    A, H = x4.shape[:2]
    half = D // 2
    block_d = triton.next_power_of_2(half)
    block_t = block_size(T, 1, 128 if interpreting() else max(1, 2048 // block_d))
    acc = acc_dtype(torch.promote_types(torch.promote_types(x.dtype, cos.dtype), out_dtype))
    grid = (A * H * triton.cdiv(T, block_t),)
    rope_kernel[grid](
        x4, cos, sin, out, H, T, half, *x4.stride(), *cos.stride(), *sin.stride(),
        TRANSPOSE=transpose, ACC=acc, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out


class RopeFunction(torch.autograd.Function):
    """(x, cos, sin) -> RoPE(x), or its transpose with `transpose`; the backward is this Function
    with `transpose` flipped, written in x's dtype. No gradient flows to cos and sin."""

    @staticmethod
    def forward(ctx, x, cos, sin, transpose: bool = False, out_dtype: torch.dtype | None = None):
        if out_dtype is None:
            out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.transpose, ctx.x_dtype = transpose, x.dtype
        return rope_forward(x, cos, sin, transpose, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        assert not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]), "rope: cos and sin take no gradient"
        cos, sin = ctx.saved_tensors
        dx = RopeFunction.apply(grad, cos, sin, not ctx.transpose, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.rope.apply_rope for x [..., T, D] and cos, sin [T, D] (constants)."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos and sin are constants here; the Triton path gives them no gradient")
    return RopeFunction.apply(x, cos, sin)
