"""TTT-E2E's inner SGD step with a per-sequence global-norm clip, in Triton, differentiable to any
order (the torch path: models/ttt.py, clip_by_global_norm and the update after it).

    new_weights = clipped_sgd_step(weights, grads, lr, max_norm)

Every tensor has the sequence as its leading dim; the clip is joint over all of a sequence's
tensors (all suffix layers' w1, w2, w3):  scale[b] = min(1, max_norm / (‖g[b]‖ + 1e-6)) and
w'[b] = w[b] - lr · scale[b] · g[b].

Two kernels do the work, one per pass over the data:
- `row_dot_partials_kernel`: per-sequence partial sums of a ∘ b (a ∘ a for squared norms) over
  blocks of each tensor, all tensors writing into one [B, blocks] buffer that is summed once;
  fixed order, so the result is deterministic (no atomics).
- `row_axpy_kernel`: out[b] = x[b] + alpha[b] · y[b] (x may be absent or shared by the batch).

The per-sequence scalars in between (norm, clip scale) are [B] vectors handled by torch. Each
kernel is an autograd Function whose backward is written with the other: d(x + αy) is
(u, rowdot(u, y), α·u) and d rowdot(a, b) is (g·b, g·a), so the meta-gradient through the clip
and the update, and any higher order, stays on these two kernels. Memory: the step keeps the
gradients (which the update needs anyway) and [B]-sized scalars; no extra copy of any tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import clip_scale
from kernels.backend import interpreting
from kernels.triton_utils import acc_dtype, block_size, empty, unit_stride_rows


@triton.jit
def row_dot_partials_kernel(a_ptr, b_ptr, out_ptr, N, stride_a, stride_b, stride_out, col0,
                            SAME: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=0.0).to(ACC)
    if SAME:
        prod = a * a
    else:
        prod = a * tl.load(b_ptr + row * stride_b + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + row * stride_out + col0 + pid, tl.sum(prod, axis=0))


@triton.jit
def row_axpy_kernel(x_ptr, alpha_ptr, y_ptr, out_ptr, N, stride_x, stride_y,
                    HAS_X: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    alpha = tl.load(alpha_ptr + row).to(ACC)
    out = alpha * tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(ACC)
    if HAS_X:
        out += tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + row * N + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return block_size(n, 16, 1 << 16) if interpreting() else 4096


def row_dots(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Σ_k <a_k[b], b_k[b]> for every b (b_k None: <a_k[b], a_k[b]>). [B] in float32/float64."""
    first = pairs[0][0]
    flat = [(unit_stride_rows(a), None if b is None else unit_stride_rows(b)) for a, b in pairs]
    blocks = [_block(a.shape[1]) for a, _ in flat]
    cols = [triton.cdiv(a.shape[1], blk) for (a, _), blk in zip(flat, blocks)]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    partials = empty((first.shape[0], sum(cols)), dtype, first.device)
    col0 = 0
    for (a, b), blk, n_cols in zip(flat, blocks, cols):
        row_dot_partials_kernel[(n_cols, a.shape[0])](
            a, a if b is None else b, partials, a.shape[1], a.stride(0), (a if b is None else b).stride(0),
            partials.stride(0), col0, SAME=b is None, ACC=acc_dtype(a.dtype), BLOCK=blk, num_warps=8,
        )
        col0 += n_cols
    return partials.sum(1)


def row_axpy(x: torch.Tensor | None, alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + alpha[b] · y (x None: alpha[b] · y), shaped and typed like y."""
    yf = unit_stride_rows(y)
    xf = unit_stride_rows(x) if x is not None else None
    out = empty(y.shape, y.dtype, y.device)
    N, block = yf.shape[1], _block(yf.shape[1])
    row_axpy_kernel[(triton.cdiv(N, block), yf.shape[0])](
        xf if xf is not None else yf, alpha.contiguous(), yf, out, N, (xf if xf is not None else yf).stride(0),
        yf.stride(0), HAS_X=x is not None, ACC=acc_dtype(y.dtype), BLOCK=block, num_warps=8,
    )
    return out


class RowDotsFunction(torch.autograd.Function):
    """(a_1..a_n, b_1..b_n) -> Σ_k rowdot(a_k, b_k); b_k None means a_k itself (a squared norm)."""

    @staticmethod
    def forward(ctx, n, *tensors):
        a, b = tensors[:n], tensors[n:]
        ctx.n = n
        ctx.save_for_backward(*tensors)
        return row_dots(list(zip(a, b)))

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        a, b = saved[: ctx.n], saved[ctx.n:]
        grads_a, grads_b = [], []
        for k in range(ctx.n):
            if b[k] is None:  # d‖a‖² = 2a
                grads_a.append(RowAxpyFunction.apply(None, 2 * g, a[k]) if ctx.needs_input_grad[1 + k] else None)
                grads_b.append(None)
            else:
                grads_a.append(RowAxpyFunction.apply(None, g, b[k]) if ctx.needs_input_grad[1 + k] else None)
                grads_b.append(RowAxpyFunction.apply(None, g, a[k]) if ctx.needs_input_grad[1 + ctx.n + k] else None)
        return None, *grads_a, *grads_b


class RowAxpyFunction(torch.autograd.Function):
    """(x, alpha, y) -> x + alpha[b] · y, x optional."""

    @staticmethod
    def forward(ctx, x, alpha, y):
        ctx.has_x = x is not None
        ctx.save_for_backward(alpha, y)
        return row_axpy(x, alpha, y)

    @staticmethod
    def backward(ctx, u):
        alpha, y = ctx.saved_tensors
        dx = u if ctx.has_x and ctx.needs_input_grad[0] else None
        dalpha = RowDotsFunction.apply(1, u, y).to(alpha.dtype) if ctx.needs_input_grad[1] else None
        dy = RowAxpyFunction.apply(None, alpha, u) if ctx.needs_input_grad[2] else None
        return dx, dalpha, dy


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_k ‖t_k[b]‖² for every sequence b: [B]."""
    return RowDotsFunction.apply(len(tensors), *tensors, *([None] * len(tensors)))


def clipped_sgd_step(weights: list[torch.Tensor], grads: list[torch.Tensor], lr: float, max_norm: float,
                     eps: float = 1e-6) -> list[torch.Tensor]:
    """w - lr · clip(g), the clip to global norm max_norm taken per sequence over all tensors."""
    sq = squared_norms(grads)
    scale = clip_scale(sq, max_norm, eps)
    step = (-lr * scale).to(grads[0].dtype)
    return [RowAxpyFunction.apply(w.to(g.dtype), step, g) for w, g in zip(weights, grads)]
