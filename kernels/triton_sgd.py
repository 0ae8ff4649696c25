"""TTT-E2E's inner SGD step with a per-sequence global-norm clip, in Triton, differentiable to any
order (the torch path and reference: kernels/sgd.py).

    new_weights = clipped_sgd_step(weights, grads, lr, max_norm)

Every tensor has the sequence as its leading dim; the clip is joint over all of a sequence's
tensors (all suffix layers' w1, w2, w3, and every memory level's):  scale[b] = min(1, max_norm /
(‖g[b]‖ + 1e-6)) and w'[b] = w[b] - lr · scale[b] · g[b].

A step is two Triton launches however many tensors there are (k): each kernel takes all k tensors
as tuples and unrolls over them at compile time, every program owning one block of one tensor's
row (no pointer table on the device, so the step can be captured in a CUDA graph).
- `row_dot_partials_kernel`: per-sequence partial sums of a ∘ b (a ∘ a for squared norms) over
  the blocks of all tensors, into one [B, blocks] buffer that one torch sum reduces; fixed order,
  so the result is deterministic (no atomics).
- `row_axpy_kernel`: out_k[b] = x_k[b] + alpha[b] · y_k[b] for every k (x absent or shared by the
  batch); with CLIP, alpha[b] is -lr · clip_scale(sq[b]), computed in the kernel from the norms.

Each kernel is an autograd Function whose backward is written with the two Functions (and torch
on [B] scalars): d(x + αy) is (u, rowdot(u, y), α·u), d rowdot(a, b) is (g·b, g·a), so the first
backward of a step is three launches (the update's row-dot and axpy, the norm's axpy), and the
meta-gradient through the clip and the update, and any higher order, stays on these two kernels.
Memory: the step keeps the gradients (which the update needs anyway) and [B]-sized scalars; no
extra copy of any tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sgd import clip_scale
from kernels.backend import interpreting
from kernels.triton_utils import acc_dtype, block_size, empty, unit_stride_rows

# The block every program covers; None: the default below. Tests set a small one to spread each
# tensor over several blocks.
BLOCK: int | None = None


@triton.jit
def row_dot_partials_kernel(a_ptrs, b_ptrs, sizes, a_strides, b_strides, bounds, out_ptr, stride_out,
                            SAME: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Program (pid, row) is block pid - bounds[k] of tensor k, for the k with bounds[k] <= pid < bounds[k + 1].
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    for k in tl.static_range(len(a_ptrs)):
        if (pid >= bounds[k]) & (pid < bounds[k + 1]):
            offs = (pid - bounds[k]) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < sizes[k]
            a = tl.load(a_ptrs[k] + row * a_strides[k] + offs, mask=mask, other=0.0).to(ACC)
            if SAME:
                prod = a * a
            else:
                prod = a * tl.load(b_ptrs[k] + row * b_strides[k] + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptr + row * stride_out + pid, tl.sum(prod, axis=0))


@triton.jit
def row_axpy_kernel(x_ptrs, y_ptrs, out_ptrs, sizes, x_strides, y_strides, bounds, alpha_ptr, lr_ptr,
                    max_norm: tl.float64, eps: tl.float64,
                    HAS_X: tl.constexpr, CLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    alpha = tl.load(alpha_ptr + row).to(ACC)
    if CLIP:
        # alpha holds the squared norm: the step is -lr · clip_scale(sq), in clip_scale's order of
        # operations (max_norm / t is reciprocal(t) · max_norm in torch) and IEEE-rounded, so it
        # matches the torch path; the float arguments come as float64 and are rounded to ACC here.
        pos = alpha > 0
        if ACC == tl.float64:
            inv = 1.0 / (tl.sqrt(tl.where(pos, alpha, 1.0)) + tl.full([], eps, ACC))
        else:
            inv = tl.div_rn(1.0, tl.sqrt_rn(tl.where(pos, alpha, 1.0)) + tl.full([], eps, ACC))
        scale = tl.where(pos, tl.minimum(inv * tl.full([], max_norm, ACC), 1.0), 1.0)
        alpha = scale * -tl.load(lr_ptr).to(ACC)
    for k in tl.static_range(len(y_ptrs)):
        if (pid >= bounds[k]) & (pid < bounds[k + 1]):
            offs = (pid - bounds[k]) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < sizes[k]
            out_ty = out_ptrs[k].dtype.element_ty
            step = alpha
            if CLIP:  # the step in the update's dtype, as w - lr·scale·g would take it
                step = alpha.to(out_ty).to(ACC)
            out = step * tl.load(y_ptrs[k] + row * y_strides[k] + offs, mask=mask, other=0.0).to(ACC)
            if HAS_X:
                out += tl.load(x_ptrs[k] + row * x_strides[k] + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptrs[k] + row * sizes[k] + offs, out.to(out_ty), mask=mask)


def _layout(flat: list[torch.Tensor]):
    """One block size for all tensors ([rows, n_k]) and where each tensor's blocks start and end."""
    sizes = [t.shape[1] for t in flat]
    block = BLOCK or (block_size(max(sizes), 16, 1 << 16) if interpreting() else 4096)
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + triton.cdiv(n, block))
    return tuple(sizes), tuple(bounds), block


def _acc(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_dots(a: list[torch.Tensor], b: list[torch.Tensor] | None) -> torch.Tensor:
    """Σ_k <a_k[b], b_k[b]> for every row b (b None: Σ_k ‖a_k[b]‖²): [B] in float32/float64."""
    fa = [unit_stride_rows(t) for t in a]
    fb = fa if b is None else [unit_stride_rows(t) for t in b]
    sizes, bounds, block = _layout(fa)
    dtype = _acc(fa + fb)
    partials = empty((fa[0].shape[0], bounds[-1]), dtype, fa[0].device)
    row_dot_partials_kernel[(bounds[-1], fa[0].shape[0])](
        tuple(fa), tuple(fb), sizes, tuple(t.stride(0) for t in fa), tuple(t.stride(0) for t in fb), bounds,
        partials, partials.stride(0), SAME=b is None, ACC=acc_dtype(dtype), BLOCK=block, num_warps=8,
    )
    return partials.sum(1)


def row_axpy(x: list[torch.Tensor] | None, alpha: torch.Tensor, y: list[torch.Tensor],
             clip: tuple[float, float, float] | None = None) -> list[torch.Tensor]:
    """x_k + alpha[b] · y_k for every k (x None: alpha[b] · y_k), each shaped and typed like y_k.
    clip (lr, max_norm, eps): alpha is the squared norm sq and the factor -lr · clip_scale(sq); lr is a
    0-dim tensor on the device, read by the kernel (a CUDA graph replays whatever value it holds)."""
    fy = [unit_stride_rows(t) for t in y]
    fx = fy if x is None else [unit_stride_rows(t) for t in x]
    outs = [empty(t.shape, t.dtype, t.device) for t in y]
    sizes, bounds, block = _layout(fy)
    lr, max_norm, eps = clip if clip is not None else (alpha, 0.0, 0.0)
    row_axpy_kernel[(bounds[-1], fy[0].shape[0])](
        tuple(fx), tuple(fy), tuple(outs), sizes, tuple(t.stride(0) for t in fx), tuple(t.stride(0) for t in fy),
        bounds, alpha.contiguous(), lr, float(max_norm), float(eps), HAS_X=x is not None,
        CLIP=clip is not None, ACC=acc_dtype(_acc(fy)), BLOCK=block, num_warps=8,
    )
    return outs


def _select(tensors, needed):
    return [t for t, need in zip(tensors, needed) if need]


def _scatter(values, needed):
    values = iter(values)
    return [next(values) if need else None for need in needed]


class RowDotsFunction(torch.autograd.Function):
    """(n, a_1..a_n, b_1..b_n) -> Σ_k rowdot(a_k, b_k), one launch; all b None: Σ_k ‖a_k‖²."""

    @staticmethod
    def forward(ctx, n, *tensors):
        a, b = tensors[:n], tensors[n:]
        ctx.n, ctx.same = n, all(t is None for t in b)
        if not ctx.same and any(t is None for t in b):
            raise ValueError("row_dots: b is all tensors or all None")
        ctx.save_for_backward(*a, *(() if ctx.same else b))
        return row_dots(list(a), None if ctx.same else list(b))

    @staticmethod
    def backward(ctx, g):
        n, saved = ctx.n, ctx.saved_tensors
        a, b = saved[:n], saved[n:]
        need_a, need_b = ctx.needs_input_grad[1:1 + n], ctx.needs_input_grad[1 + n:]
        if ctx.same:  # d‖a‖² = 2a
            alpha, ys = 2 * g, _select(a, need_a)
        else:  # one launch for every a_k's (g·b_k) and b_k's (g·a_k)
            alpha, ys = g, _select(b, need_a) + _select(a, need_b)
        grads = iter(AxpyFunction.apply(alpha, *ys) if ys else ())
        grads_a = _scatter(grads, need_a)
        grads_b = [None] * n if ctx.same else _scatter(grads, need_b)
        return None, *grads_a, *grads_b


class AxpyFunction(torch.autograd.Function):
    """(alpha, y_1..y_n) -> (alpha[b] · y_k for every k), one launch."""

    @staticmethod
    def forward(ctx, alpha, *ys):
        ctx.save_for_backward(alpha, *ys)
        return tuple(row_axpy(None, alpha, list(ys)))

    @staticmethod
    def backward(ctx, *us):
        alpha, *ys = ctx.saved_tensors
        need_y = ctx.needs_input_grad[1:]
        dalpha = RowDotsFunction.apply(len(ys), *us, *ys).to(alpha.dtype) if ctx.needs_input_grad[0] else None
        sel = _select(us, need_y)
        dys = _scatter(AxpyFunction.apply(alpha, *sel) if sel else (), need_y)
        return dalpha, *dys


def _clip_scale_grad(sq: torch.Tensor, max_norm: float, eps: float) -> torch.Tensor:
    """d clip_scale(sq) / d sq in torch ops on [B], so that it differentiates again: where the clip
    acts, scale = max_norm / (n + eps) with n = √sq, and its derivative is -scale / ((n + eps) · 2n);
    elsewhere 0 (clamp passes the gradient at scale = 1 exactly, as torch's does). The root is of a
    safe value, so a zero gradient's row stays finite at every order."""
    pos = sq > 0
    norm = torch.where(pos, sq, torch.ones_like(sq)).sqrt()
    raw = max_norm / (norm + eps)
    return torch.where(pos & (raw <= 1), -raw / ((norm + eps) * 2 * norm), torch.zeros_like(sq))


class ClippedStepFunction(torch.autograd.Function):
    """(lr, max_norm, eps, sq, w_1..w_n, g_1..g_n) -> (w_k - lr · clip_scale(sq)[b] · g_k), one launch."""

    @staticmethod
    def forward(ctx, lr, max_norm, eps, sq, *tensors):
        n = len(tensors) // 2
        ctx.clip = (lr, max_norm, eps)
        ctx.save_for_backward(sq, *tensors[n:])
        return tuple(row_axpy(list(tensors[:n]), sq, list(tensors[n:]), clip=ctx.clip))

    @staticmethod
    def backward(ctx, *us):
        lr, max_norm, eps = ctx.clip
        sq, *gs = ctx.saved_tensors
        n = len(gs)
        need_w, need_g = ctx.needs_input_grad[4:4 + n], ctx.needs_input_grad[4 + n:]
        step = (-lr * clip_scale(sq, max_norm, eps)).to(gs[0].dtype)
        sel = _select(us, need_g)
        dgs = _scatter(AxpyFunction.apply(step, *sel) if sel else (), need_g)
        dsq = None
        if ctx.needs_input_grad[3]:
            dstep = RowDotsFunction.apply(n, *us, *gs)
            dsq = (dstep * (-lr * _clip_scale_grad(sq, max_norm, eps))).to(sq.dtype)
        dws = [u if need else None for u, need in zip(us, need_w)]
        return None, None, None, dsq, *dws, *dgs


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_k ‖t_k[b]‖² for every sequence b: [B]."""
    return RowDotsFunction.apply(len(tensors), *tensors, *([None] * len(tensors)))


def clipped_sgd_step(weights: list[torch.Tensor], grads: list[torch.Tensor], lr: float | torch.Tensor, max_norm: float,
                     eps: float = 1e-6) -> list[torch.Tensor]:
    """w - lr · clip(g), the clip to global norm max_norm taken per sequence over all tensors."""
    sq = squared_norms(grads)
    if not isinstance(lr, torch.Tensor):  # a fill on the device, not a copy from the host: capturable
        lr = torch.full((), float(lr), dtype=torch.float64, device=sq.device)
    new = ClippedStepFunction.apply(lr, float(max_norm), float(eps), sq,
                                    *(w.to(g.dtype) for w, g in zip(weights, grads)), *grads)
    return list(new)
