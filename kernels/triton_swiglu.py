"""SwiGLU with per-sequence fast weights in Triton: y = (silu(x W1ᵀ) ∘ x W3ᵀ) W2ᵀ, differentiable
to any order.

    x [B, T, d];  w1, w3 [B, I, d] (or shared [I, d]);  w2 [B, d, I] (or [d, I])  ->  [B, T, d]

How it is split, and why. TTT-E2E differentiates the fast MLP's gradient again (the meta-gradient
flows through every inner update), so the backward must itself be differentiable. Rather than one
fused kernel per order (forward, backward, backward of backward: three kernels whose algebra grows
with every order), the op is composed of autograd Functions whose backward is written with
Functions of the same set:

- `SwiGLUUpFunction` (one kernel): gate = x W1ᵀ and up = x W3ᵀ in one pass over x with two
  accumulators, and h = silu(gate) ∘ up in the epilogue. It also returns gate and up as outputs,
  so when its backward uses them, the graph of that backward leads back here and a second-order
  gradient reaches x and the weights through them.
- `GateGradFunction` (one elementwise kernel): (dgate, dup) from (dh, gate, up); its backward is
  `GateGradGradFunction` (one elementwise kernel, silu''), whose own backward is written in torch
  elementwise ops, so third and higher orders still work, off the Triton path.
- every plain matmul, in every order, is torch.bmm: the vendor's batched GEMM, differentiable to
  any order by torch itself. (A hand-written Triton batched matmul measured 3x slower than it on an
  H200 at the bench's shapes, and took the whole op from 3.2 to 5.4 ms at three orders.)

Memory: the forward keeps x, the weights and three [B, T, I] tensors: gate, up and h (torch's
composition keeps silu(gate) as a fourth). A first backward whose graph is kept for the
meta-gradient adds dh, dgate and dup; the second backward keeps nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import compute_dtype, interpreting
from kernels.triton_utils import acc_dtype, block_size, dot_precision, empty


@triton.jit
def swiglu_up_kernel(
    x_ptr, w1_ptr, w3_ptr, gate_ptr, up_ptr, h_ptr, T, I, D,
    stride_xb, stride_xt, stride_xd,
    stride_w1b, stride_w1i, stride_w1d,
    stride_w3b, stride_w3i, stride_w3d,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t, pid_i = tl.program_id(0), tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + batch * stride_xb + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd
    # W1ᵀ and W3ᵀ tiles [BLOCK_D, BLOCK_I], read through the strides.
    w1_ptrs = w1_ptr + batch * stride_w1b + offs_d[:, None] * stride_w1d + offs_i[None, :] * stride_w1i
    w3_ptrs = w3_ptr + batch * stride_w3b + offs_d[:, None] * stride_w3d + offs_i[None, :] * stride_w3i
    gate = tl.zeros((BLOCK_T, BLOCK_I), dtype=ACC)
    up = tl.zeros((BLOCK_T, BLOCK_I), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(x_ptrs, mask=(offs_t[:, None] < T) & (offs_d[None, :] + d0 < D), other=0.0)
        w_mask = (offs_d[:, None] + d0 < D) & (offs_i[None, :] < I)
        gate += tl.dot(x, tl.load(w1_ptrs, mask=w_mask, other=0.0), input_precision=PRECISION)
        up += tl.dot(x, tl.load(w3_ptrs, mask=w_mask, other=0.0), input_precision=PRECISION)
        x_ptrs += BLOCK_D * stride_xd
        w1_ptrs += BLOCK_D * stride_w1d
        w3_ptrs += BLOCK_D * stride_w3d
    h = gate / (1.0 + tl.exp(-gate)) * up
    out = batch * T * I + offs_t[:, None] * I + offs_i[None, :]
    mask = (offs_t[:, None] < T) & (offs_i[None, :] < I)
    dtype = h_ptr.dtype.element_ty
    tl.store(gate_ptr + out, gate.to(dtype), mask=mask)
    tl.store(up_ptr + out, up.to(dtype), mask=mask)
    tl.store(h_ptr + out, h.to(dtype), mask=mask)


@triton.jit
def gate_grad_kernel(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """h = silu(gate) ∘ up:  dgate = g ∘ up ∘ silu'(gate),  dup = g ∘ silu(gate)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    s = 1.0 / (1.0 + tl.exp(-a))
    silu1 = s * (1.0 + a * (1.0 - s))
    dtype = dgate_ptr.dtype.element_ty
    tl.store(dgate_ptr + offs, (g * b * silu1).to(dtype), mask=mask)
    tl.store(dup_ptr + offs, (g * a * s).to(dtype), mask=mask)


@triton.jit
def gate_grad_grad_kernel(
    g_ptr, gate_ptr, up_ptr, ua_ptr, ub_ptr, dg_ptr, dgate_ptr, dup_ptr, n,
    HAS_UA: tl.constexpr, HAS_UB: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward of gate_grad_kernel, given the cotangents ua, ub of (dgate, dup):
    dg = ua∘up∘silu' + ub∘silu,  dgate = ua∘g∘up∘silu'' + ub∘g∘silu',  dup = ua∘g∘silu'."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    s = 1.0 / (1.0 + tl.exp(-a))
    q = s * (1.0 - s)
    silu0 = a * s
    silu1 = s + a * q
    silu2 = q * (2.0 + a * (1.0 - 2.0 * s))
    dg = tl.zeros_like(g)
    dgate = tl.zeros_like(g)
    dup = tl.zeros_like(g)
    if HAS_UA:
        ua = tl.load(ua_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        dg += ua * b * silu1
        dgate += ua * g * b * silu2
        dup += ua * g * silu1
    if HAS_UB:
        ub = tl.load(ub_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        dg += ub * silu0
        dgate += ub * g * silu1
    dtype = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + offs, dg.to(dtype), mask=mask)
    tl.store(dgate_ptr + offs, dgate.to(dtype), mask=mask)
    tl.store(dup_ptr + offs, dup.to(dtype), mask=mask)


def _elementwise_block(n: int) -> int:
    return block_size(n, 16, 1 << 16) if interpreting() else 1024


def swiglu_up_forward(x, w1, w3):
    batch, T, D = x.shape
    I = w1.shape[1]
    gate, up, h = (empty((batch, T, I), x.dtype, x.device) for _ in range(3))
    if interpreting():
        bt, bi, bd = block_size(T, 16, 128), block_size(I, 16, 128), block_size(D, 16, 128)
    else:
        bt, bi, bd = 64, 64, 32
    grid = (triton.cdiv(T, bt), triton.cdiv(I, bi), batch)
    swiglu_up_kernel[grid](
        x, w1, w3, gate, up, h, T, I, D, *x.stride(), *w1.stride(), *w3.stride(),
        ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype), BLOCK_T=bt, BLOCK_I=bi, BLOCK_D=bd, num_warps=4,
    )
    return gate, up, h


class SwiGLUUpFunction(torch.autograd.Function):
    """(x, w1, w3) -> (gate, up, silu(gate) ∘ up)."""

    @staticmethod
    def forward(ctx, x, w1, w3):
        gate, up, h = swiglu_up_forward(x, w1, w3)
        ctx.save_for_backward(x, w1, w3, gate, up)
        ctx.set_materialize_grads(False)
        return gate, up, h

    @staticmethod
    def backward(ctx, dgate, dup, dh):
        x, w1, w3, gate, up = ctx.saved_tensors
        if dh is not None:
            dgate_h, dup_h = gate_grad(dh, gate, up)
            dgate = dgate_h if dgate is None else dgate + dgate_h
            dup = dup_h if dup is None else dup + dup_h
        dx = dw1 = dw3 = None
        if ctx.needs_input_grad[0]:
            parts = [torch.bmm(dy, w) for dy, w in ((dgate, w1), (dup, w3)) if dy is not None]
            dx = sum(parts[1:], parts[0]) if parts else None
        if ctx.needs_input_grad[1] and dgate is not None:
            dw1 = torch.bmm(dgate.transpose(1, 2), x)
        if ctx.needs_input_grad[2] and dup is not None:
            dw3 = torch.bmm(dup.transpose(1, 2), x)
        return dx, dw1, dw3


def gate_grad_forward(g, gate, up):
    g, gate, up = g.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = empty(gate.shape, gate.dtype, gate.device), empty(gate.shape, gate.dtype, gate.device)
    n, block = gate.numel(), _elementwise_block(gate.numel())
    gate_grad_kernel[(triton.cdiv(n, block),)](g, gate, up, dgate, dup, n, COMPUTE=acc_dtype(gate.dtype), BLOCK=block)
    return dgate, dup


class GateGradFunction(torch.autograd.Function):
    """(g, gate, up) -> (dgate, dup), the backward of h = silu(gate) ∘ up."""

    @staticmethod
    def forward(ctx, g, gate, up):
        ctx.save_for_backward(g, gate, up)
        ctx.set_materialize_grads(False)
        return gate_grad_forward(g, gate, up)

    @staticmethod
    def backward(ctx, u_gate, u_up):
        if u_gate is None and u_up is None:
            return None, None, None
        g, gate, up = ctx.saved_tensors
        return GateGradGradFunction.apply(g, gate, up, u_gate, u_up)


def gate_grad_grad_forward(g, gate, up, u_gate, u_up):
    g, gate, up = g.contiguous(), gate.contiguous(), up.contiguous()
    u_gate = u_gate.contiguous() if u_gate is not None else None
    u_up = u_up.contiguous() if u_up is not None else None
    outs = [empty(gate.shape, gate.dtype, gate.device) for _ in range(3)]
    n, block = gate.numel(), _elementwise_block(gate.numel())
    gate_grad_grad_kernel[(triton.cdiv(n, block),)](
        g, gate, up, u_gate if u_gate is not None else g, u_up if u_up is not None else g, *outs, n,
        HAS_UA=u_gate is not None, HAS_UB=u_up is not None, COMPUTE=acc_dtype(gate.dtype), BLOCK=block,
    )
    return tuple(outs)


def silu_derivatives(a: torch.Tensor):
    """silu and its first three derivatives, in torch ops (differentiable to any order)."""
    s = torch.sigmoid(a)
    q = s * (1 - s)
    return (a * s, s + a * q, q * (2 + a * (1 - 2 * s)), q * ((1 - 2 * s) * (3 + a * (1 - 2 * s)) - 2 * a * q))


class GateGradGradFunction(torch.autograd.Function):
    """(g, gate, up, u_gate, u_up) -> (dg, dgate, dup), the backward of GateGradFunction."""

    @staticmethod
    def forward(ctx, g, gate, up, u_gate, u_up):
        ctx.save_for_backward(g, gate, up, u_gate, u_up)
        return gate_grad_grad_forward(g, gate, up, u_gate, u_up)

    @staticmethod
    def backward(ctx, c_g, c_gate, c_up):
        # Third order and beyond: rare enough for plain torch, and recorded by autograd.
        g, a, b, ua, ub = ctx.saved_tensors
        has_ua, has_ub = ua is not None, ub is not None
        ua = torch.zeros_like(a) if ua is None else ua
        ub = torch.zeros_like(a) if ub is None else ub
        s0, s1, s2, s3 = silu_derivatives(a)
        d_g = c_gate * (ua * b * s2 + ub * s1) + c_up * ua * s1
        d_a = c_g * (ua * b * s2 + ub * s1) + c_gate * (ua * g * b * s3 + ub * g * s2) + c_up * ua * g * s2
        d_b = c_g * ua * s1 + c_gate * ua * g * s2
        d_ua = c_g * b * s1 + c_gate * g * b * s2 + c_up * g * s1 if has_ua else None
        d_ub = c_g * s0 + c_gate * g * s1 if has_ub else None
        return d_g, d_a, d_b, d_ua, d_ub


def gate_grad(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(dgate, dup) of h = silu(gate) ∘ up for the incoming gradient g; differentiable."""
    return GateGradFunction.apply(g, gate, up)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.swiglu.swiglu: shared weights [I, d] or per-sequence [B, I, d]."""
    dtype = compute_dtype(x, w1, w2, w3)
    x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
    shared = w1.dim() == 2
    if shared:  # one batch of all tokens against one set of weights
        shape = x.shape
        x = x.reshape(1, -1, shape[-1])
        w1, w2, w3 = w1.unsqueeze(0), w2.unsqueeze(0), w3.unsqueeze(0)
    h = SwiGLUUpFunction.apply(x, w1, w3)[2]
    y = torch.bmm(h, w2.transpose(1, 2))
    return y.view(shape) if shared else y
