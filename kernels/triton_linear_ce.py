"""Linear head + per-token cross-entropy that never holds all [N, V] logits, twice differentiable.

    losses = linear_cross_entropy(hidden [N, d], weight [V, d], targets [N], chunk_rows=None)  ->  [N]

Same contract as kernels/linear_ce.py (targets -100 give a loss of 0). TTT-E2E's inner loss is this
op on every chunk, and the meta-gradient differentiates its gradient again; with torch's ops the
graph of that gradient keeps several [N, V] float32 tensors (softmax, its gradient, ...) for every
inner step. Here the rows are processed `chunk_rows` at a time: each chunk's logits are one matmul
(cuBLAS; it is the bulk of the FLOPs and cuBLAS runs it at peak), and a Triton row kernel does
the softmax arithmetic of that chunk in place, so one [chunk_rows, V] tile exists at a time.

With Z = H Wᵀ, P = softmax(Z), Y the one-hot targets and g the incoming per-row gradient:

forward   L = logsumexp(Z) and loss = L - Z[target].  Keeps h, W, targets, L ([N]).
backward  A = g∘(P - Y) per chunk (in place of its logits);  dH = A W,  dW = Σ_chunks Aᵀ H.
          An autograd Function itself, keeping h, W, g, targets, L.
double    given cotangents (Gh, GW) of (dH, dW), per chunk:  B = Gh Wᵀ + H GWᵀ,  β = rowsum(P∘B),
backward  Z̄ = g∘P∘(B - β);   gH = A GW + Z̄ W,  gW = Σ Aᵀ Gh + Z̄ᵀ H,  gg = β - B[target].
          Two [chunk_rows, V] tiles at a time. No third derivative (once_differentiable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.backend import compute_dtype, interpreting
from kernels.triton_utils import acc_dtype, block_size, empty

IGNORE_INDEX = -100


@triton.jit
def ce_forward_kernel(Z, TARGETS, LOSS, LSE, R, V, IGNORE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tgt = tl.load(TARGETS + rows, mask=row_mask, other=IGNORE)
    m = tl.full([BLOCK_R], -1.0e30, ACC)
    s = tl.zeros([BLOCK_R], ACC)
    z_tgt = tl.zeros([BLOCK_R], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < V)
        z = tl.load(Z + rows[:, None] * V + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    lse = m + tl.log(tl.where(s > 0, s, 1.0))
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(LOSS + rows, tl.where(tgt != IGNORE, lse - z_tgt, 0.0), mask=row_mask)


@triton.jit
def ce_backward_kernel(Z, TARGETS, LSE, G, R, V, IGNORE: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrites the logits Z with A = g∘(softmax(Z) - onehot(target)); rows without a target get 0."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tgt = tl.load(TARGETS + rows, mask=row_mask, other=IGNORE)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0).to(ACC)
    g = tl.load(G + rows, mask=row_mask, other=0.0).to(ACC)
    g = tl.where(tgt != IGNORE, g, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < V)
        ptrs = Z + rows[:, None] * V + cols[None, :]
        p = tl.exp(tl.load(ptrs, mask=mask, other=0.0).to(ACC) - lse[:, None])
        a = g[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
        tl.store(ptrs, a.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def ce_backward_backward_kernel(Z, BM, TARGETS, LSE, G, GG, R, V, IGNORE: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Given the logits Z and B = Gh Wᵀ + H GWᵀ of a chunk: overwrites Z with A = g∘(P - Y) and B
    with Z̄ = g∘P∘(B - β), and writes gg = β - B[target], where β = rowsum(P∘B)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tgt = tl.load(TARGETS + rows, mask=row_mask, other=IGNORE)
    valid = tgt != IGNORE
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0).to(ACC)
    g = tl.where(valid, tl.load(G + rows, mask=row_mask, other=0.0).to(ACC), 0.0)
    beta = tl.zeros([BLOCK_R], ACC)
    b_tgt = tl.zeros([BLOCK_R], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < V)
        offs = rows[:, None] * V + cols[None, :]
        p = tl.exp(tl.load(Z + offs, mask=mask, other=float("-inf")).to(ACC) - lse[:, None])
        b = tl.load(BM + offs, mask=mask, other=0.0).to(ACC)
        beta += tl.sum(p * b, 1)
        b_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], b, 0.0), 1)
    tl.store(GG + rows, tl.where(valid, beta - b_tgt, 0.0), mask=row_mask)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < V)
        offs = rows[:, None] * V + cols[None, :]
        p = tl.exp(tl.load(Z + offs, mask=mask, other=float("-inf")).to(ACC) - lse[:, None])
        b = tl.load(BM + offs, mask=mask, other=0.0).to(ACC)
        a = g[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
        tl.store(Z + offs, a.to(Z.dtype.element_ty), mask=mask)
        tl.store(BM + offs, (g[:, None] * p * (b - beta[:, None])).to(BM.dtype.element_ty), mask=mask)


def _row_grid(R: int, V: int):
    if interpreting():
        br, bv = block_size(R, 1, 64), block_size(V, 16, 4096)
    else:
        br, bv = 1, block_size(V, 16, 4096)
    return (triton.cdiv(R, br),), dict(BLOCK_R=br, BLOCK_V=bv, num_warps=8 if bv >= 2048 else 4)


def _chunks(N: int, chunk_rows: int):
    for start in range(0, N, chunk_rows):
        yield slice(start, min(N, start + chunk_rows))


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc possibly wider than a and b (float32 sums of bf16 chunks)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


def ce_forward(h, w, targets, chunk_rows):
    N, V = h.shape[0], w.shape[0]
    stat_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    loss, lse = empty((N,), stat_dtype, h.device), empty((N,), stat_dtype, h.device)
    for rows in _chunks(N, chunk_rows):
        z = h[rows] @ w.t()
        grid, meta = _row_grid(z.shape[0], V)
        ce_forward_kernel[grid](z, targets[rows], loss[rows], lse[rows], z.shape[0], V,
                                IGNORE=IGNORE_INDEX, ACC=acc_dtype(h.dtype), **meta)
    return loss, lse


def ce_backward(h, w, g, lse, targets, chunk_rows):
    N, V = h.shape[0], w.shape[0]
    dh = empty(h.shape, h.dtype, h.device)
    dw = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    for rows in _chunks(N, chunk_rows):
        z = h[rows] @ w.t()
        grid, meta = _row_grid(z.shape[0], V)
        ce_backward_kernel[grid](z, targets[rows], lse[rows], g[rows], z.shape[0], V,
                                 IGNORE=IGNORE_INDEX, ACC=acc_dtype(h.dtype), **meta)
        torch.mm(z, w, out=dh[rows])
        _add_matmul(dw, z.t(), h[rows])
    return dh, dw.to(w.dtype)


def ce_backward_backward(h, w, g, lse, targets, gh, gw, chunk_rows):
    N, V = h.shape[0], w.shape[0]
    gh, gw = gh.contiguous(), gw.contiguous()
    out_h = empty(h.shape, h.dtype, h.device)
    out_w = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    out_g = empty(g.shape, g.dtype, g.device)
    for rows in _chunks(N, chunk_rows):
        z = h[rows] @ w.t()
        b = gh[rows] @ w.t()
        b.addmm_(h[rows], gw.t())
        grid, meta = _row_grid(z.shape[0], V)
        ce_backward_backward_kernel[grid](z, b, targets[rows], lse[rows], g[rows], out_g[rows], z.shape[0], V,
                                          IGNORE=IGNORE_INDEX, ACC=acc_dtype(h.dtype), **meta)
        # z now holds A, b holds Z̄.
        torch.mm(z, gw, out=out_h[rows])
        out_h[rows].addmm_(b, w)
        _add_matmul(out_w, z.t(), gh[rows])
        _add_matmul(out_w, b.t(), h[rows])
    return out_h, out_w.to(w.dtype), out_g


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk_rows):
        with torch.autocast(h.device.type, enabled=False):
            loss, lse = ce_forward(h, w, targets, chunk_rows)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk_rows = chunk_rows
        return loss

    @staticmethod
    def backward(ctx, g):
        h, w, targets, lse = ctx.saved_tensors
        # L enters as a constant: the backward's own backward differentiates P as a function of h, W.
        dh, dw = LinearCrossEntropyBackwardFunction.apply(h, w, g, lse, targets, ctx.chunk_rows)
        return dh, dw, None, None


class LinearCrossEntropyBackwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, g, lse, targets, chunk_rows):
        g = g.contiguous()  # the gradient of a sum arrives expanded (stride 0); the kernels read rows
        with torch.autocast(h.device.type, enabled=False):
            dh, dw = ce_backward(h, w, g, lse, targets, chunk_rows)
        ctx.save_for_backward(h, w, g, lse, targets)
        ctx.chunk_rows = chunk_rows
        return dh, dw

    @staticmethod
    @once_differentiable
    def backward(ctx, gh, gw):
        h, w, g, lse, targets = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            out_h, out_w, out_g = ce_backward_backward(h, w, g, lse, targets, gh, gw, ctx.chunk_rows)
        return out_h, out_w, out_g, None, None, None


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: a logits tile of about 2^25 elements (128 MiB in float32)."""
    return max(1, min(n_rows, (1 << 25) // vocab))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Triton counterpart of kernels.linear_ce.linear_cross_entropy; hidden may have leading dims."""
    dtype = compute_dtype(hidden, weight)
    shape = hidden.shape[:-1]
    h = hidden.to(dtype).reshape(-1, hidden.shape[-1]).contiguous()
    w = weight.to(dtype).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} rows but {t.shape[0]} targets")
    chunk_rows = chunk_rows or default_chunk_rows(h.shape[0], w.shape[0])
    return LinearCrossEntropyFunction.apply(h, w, t, chunk_rows).view(shape)
