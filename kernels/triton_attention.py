"""Sliding-window causal attention in Triton: forward, backward and double backward, all
flash-style (scores recomputed tile by tile, never a [T, T] matrix).

    o = sliding_window_attention(q, k, v, window, scale)   # q [B, H, Tq, D]; k, v [B, H, Tk, D]

Same contract as kernels/attention.py: queries are aligned to the LAST Tq keys, and key j is
visible to query i iff  p_i - window < j <= p_i  with p_i = i + Tk - Tq (window None: causal).

Per (batch, head), with S = scale·QKᵀ (masked), P = softmax(S), O = PV:

forward      O and the row log-sum-exp L (online softmax over the key tiles a query block sees).
             Keeps q, k, v, O, L ([B, H, Tq], float32).
backward     Δ = rowsum(dO∘O), dS = P∘(dOVᵀ - Δ);  dQ = scale·dS K,  dK = scale·dSᵀQ,  dV = PᵀdO.
             Two kernels: one per query block (dQ, and Δ), one per key block (dK, dV), each
             rebuilding P from L. It is itself an autograd Function, keeping q, k, v, dO, L, Δ.
double       Given the cotangents (Gq, Gk, Gv) of (dQ, dK, dV), the gradients to q, k, v, dO.
backward     With B = scale·(Gq Kᵀ + Q Gkᵀ) and C = dO Gvᵀ (tiles, never whole):
               β = rowsum(P∘B),  γ = rowsum(dS∘B) - β∘Δ + rowsum(P∘C)
               dDP = P∘(B - β)                          (the gradient reaching dP = dO Vᵀ)
               dS̄ = P∘((dP - Δ)∘B - dP∘β + C - γ)      (the gradient reaching S)
               gQ = scale·(dS Gk + dS̄ K),   gK = scale·(dSᵀ Gq + dS̄ᵀ Q)
               gV = dDPᵀ dO,                gdO = P Gv + dDP V
             Three kernels: row statistics β, γ per query block; gQ, gdO per query block; gK, gV
             per key block. Extra memory: β and γ ([B, H, Tq]); every kernel holds a few
             [BLOCK_M, BLOCK_N] score tiles at a time. A third derivative is not provided (the
             meta-gradient needs two); asking for one raises autograd's once_differentiable error.

Work per query block covers only the keys in its window (plus the block's own span), so every
order costs O(Tq · (window + BLOCK_M) · D), like the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.backend import compute_dtype, interpreting
from kernels.triton_utils import acc_dtype, block_size, dot_precision, empty

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _key_range(m_start, T_Q, T_K, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that queries m_start .. m_start + BLOCK_M - 1 can see; lo on a tile edge."""
    offset = T_K - T_Q
    lo = tl.maximum(m_start + offset - WINDOW + 1, 0)
    hi = tl.minimum(tl.minimum(m_start + BLOCK_M, T_Q) + offset, T_K)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(n_start, T_Q, T_K, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the queries that can see keys n_start .. n_start + BLOCK_N - 1."""
    offset = T_K - T_Q
    lo = tl.maximum(n_start - offset, 0)
    hi = tl.minimum(n_start + BLOCK_N - 1 + WINDOW - offset, T_Q)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _visible(offs_m, offs_n, T_Q, T_K, WINDOW):
    pos = offs_m[:, None] + (T_K - T_Q)
    key = offs_n[None, :]
    return (offs_m[:, None] < T_Q) & (key < T_K) & (key <= pos) & (key > pos - WINDOW)


@triton.jit
def _load_tile(base, offs_t, T, offs_d, HEAD_DIM: tl.constexpr):
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_t[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, offs_t, T, offs_d, HEAD_DIM: tl.constexpr):
    mask = (offs_t[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + offs_t[:, None] * HEAD_DIM + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _probs(q, k, lse2, visible, SM_SCALE: tl.constexpr, PRECISION: tl.constexpr):
    """P tile from the stored log-sum-exp (in log2 units); exactly 0 where not visible."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SM_SCALE * LOG2E)
    return tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def _second_order_tiles(q, k, v, do, gq, gk, gv, lse2, delta, visible,
                        SM_SCALE: tl.constexpr, PRECISION: tl.constexpr):
    p = _probs(q, k, lse2, visible, SM_SCALE, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    b = tl.dot(gq, tl.trans(k), input_precision=PRECISION)
    b = (b + tl.dot(q, tl.trans(gk), input_precision=PRECISION)) * SM_SCALE
    c = tl.dot(do, tl.trans(gv), input_precision=PRECISION)
    return p, dp, ds, b, c


# ----------------------------------------------------------------------------- forward


@triton.jit
def swa_fwd_kernel(
    Q, K, V, O, LSE, T_Q, T_K, WINDOW,
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    q_base, kv_base = bh * T_Q * HEAD_DIM, bh * T_K * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    # A finite start: a row that has seen no visible key yet gets exp2(-inf - m) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    lo, hi = _key_range(pid_m * BLOCK_M, T_Q, T_K, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        v = _load_tile(V + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SM_SCALE * LOG2E)
        s = tl.where(_visible(offs_m, offs_n, T_Q, T_K, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # only rows past T_Q see no key; keep them finite
    _store_tile(O + q_base, acc / l_i[:, None], offs_m, T_Q, offs_d, HEAD_DIM)
    tl.store(LSE + bh * T_Q + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=offs_m < T_Q)


# ----------------------------------------------------------------------------- backward


@triton.jit
def swa_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, T_Q, T_K, WINDOW,
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block; also writes Δ = rowsum(dO∘O), which the dK/dV kernel reads."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    q_base, kv_base = bh * T_Q * HEAD_DIM, bh * T_K * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    do = _load_tile(DO + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    o = _load_tile(O + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    tl.store(DELTA + bh * T_Q + offs_m, delta, mask=offs_m < T_Q)
    lse2 = tl.load(LSE + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0) * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    lo, hi = _key_range(pid_m * BLOCK_M, T_Q, T_K, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        v = _load_tile(V + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        p = _probs(q, k, lse2, _visible(offs_m, offs_n, T_Q, T_K, WINDOW), SM_SCALE, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ + q_base, dq * SM_SCALE, offs_m, T_Q, offs_d, HEAD_DIM)


@triton.jit
def swa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, T_Q, T_K, WINDOW,
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    q_base, kv_base = bh * T_Q * HEAD_DIM, bh * T_K * HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
    v = _load_tile(V + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    lo, hi = _query_range(pid_n * BLOCK_N, T_Q, T_K, WINDOW, BLOCK_M, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
        do = _load_tile(DO + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
        lse2 = tl.load(LSE + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0) * LOG2E
        delta = tl.load(DELTA + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0)
        p = _probs(q, k, lse2, _visible(offs_m, offs_n, T_Q, T_K, WINDOW), SM_SCALE, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    _store_tile(DK + kv_base, dk * SM_SCALE, offs_n, T_K, offs_d, HEAD_DIM)
    _store_tile(DV + kv_base, dv, offs_n, T_K, offs_d, HEAD_DIM)


# ----------------------------------------------------------------------------- double backward


@triton.jit
def swa_bwd_bwd_stats_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, BETA, GAMMA, T_Q, T_K, WINDOW,
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """β = rowsum(P∘B) and γ = rowsum(dS∘B) - β∘Δ + rowsum(P∘C) of one query block."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    q_base, kv_base = bh * T_Q * HEAD_DIM, bh * T_K * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    do = _load_tile(DO + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    gq = _load_tile(GQ + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    lse2 = tl.load(LSE + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0)
    beta = tl.zeros([BLOCK_M], ACC)
    sigma = tl.zeros([BLOCK_M], ACC)
    pc = tl.zeros([BLOCK_M], ACC)
    lo, hi = _key_range(pid_m * BLOCK_M, T_Q, T_K, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        v = _load_tile(V + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        gk = _load_tile(GK + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        gv = _load_tile(GV + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        p, dp, ds, b, c = _second_order_tiles(q, k, v, do, gq, gk, gv, lse2, delta,
                                              _visible(offs_m, offs_n, T_Q, T_K, WINDOW), SM_SCALE, PRECISION)
        beta += tl.sum(p * b, 1)
        sigma += tl.sum(ds * b, 1)
        pc += tl.sum(p * c, 1)
    tl.store(BETA + bh * T_Q + offs_m, beta, mask=offs_m < T_Q)
    tl.store(GAMMA + bh * T_Q + offs_m, sigma - beta * delta + pc, mask=offs_m < T_Q)


@triton.jit
def swa_bwd_bwd_dq_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, BETA, GAMMA, OUT_Q, OUT_DO, T_Q, T_K, WINDOW,
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gQ = scale·(dS Gk + dS̄ K) and gdO = P Gv + dDP V of one query block."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    q_base, kv_base = bh * T_Q * HEAD_DIM, bh * T_K * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    do = _load_tile(DO + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    gq = _load_tile(GQ + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
    row_mask = offs_m < T_Q
    lse2 = tl.load(LSE + bh * T_Q + offs_m, mask=row_mask, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh * T_Q + offs_m, mask=row_mask, other=0.0)
    beta = tl.load(BETA + bh * T_Q + offs_m, mask=row_mask, other=0.0)
    gamma = tl.load(GAMMA + bh * T_Q + offs_m, mask=row_mask, other=0.0)
    acc_q = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    acc_do = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    lo, hi = _key_range(pid_m * BLOCK_M, T_Q, T_K, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        v = _load_tile(V + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        gk = _load_tile(GK + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        gv = _load_tile(GV + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
        p, dp, ds, b, c = _second_order_tiles(q, k, v, do, gq, gk, gv, lse2, delta,
                                              _visible(offs_m, offs_n, T_Q, T_K, WINDOW), SM_SCALE, PRECISION)
        ddp = p * (b - beta[:, None])
        ds_bar = p * ((dp - delta[:, None]) * b - dp * beta[:, None] + c - gamma[:, None])
        acc_q += tl.dot(ds.to(gk.dtype), gk, input_precision=PRECISION)
        acc_q += tl.dot(ds_bar.to(k.dtype), k, input_precision=PRECISION)
        acc_do += tl.dot(p.to(gv.dtype), gv, input_precision=PRECISION)
        acc_do += tl.dot(ddp.to(v.dtype), v, input_precision=PRECISION)
    _store_tile(OUT_Q + q_base, acc_q * SM_SCALE, offs_m, T_Q, offs_d, HEAD_DIM)
    _store_tile(OUT_DO + q_base, acc_do, offs_m, T_Q, offs_d, HEAD_DIM)


@triton.jit
def swa_bwd_bwd_dkdv_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, BETA, GAMMA, OUT_K, OUT_V, T_Q, T_K, WINDOW,
    SM_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """gK = scale·(dSᵀ Gq + dS̄ᵀ Q) and gV = dDPᵀ dO of one key block."""
    pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    q_base, kv_base = bh * T_Q * HEAD_DIM, bh * T_K * HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
    v = _load_tile(V + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
    gk = _load_tile(GK + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
    gv = _load_tile(GV + kv_base, offs_n, T_K, offs_d, HEAD_DIM)
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    lo, hi = _query_range(pid_n * BLOCK_N, T_Q, T_K, WINDOW, BLOCK_M, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < T_Q
        q = _load_tile(Q + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
        do = _load_tile(DO + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
        gq = _load_tile(GQ + q_base, offs_m, T_Q, offs_d, HEAD_DIM)
        lse2 = tl.load(LSE + bh * T_Q + offs_m, mask=row_mask, other=0.0) * LOG2E
        delta = tl.load(DELTA + bh * T_Q + offs_m, mask=row_mask, other=0.0)
        beta = tl.load(BETA + bh * T_Q + offs_m, mask=row_mask, other=0.0)
        gamma = tl.load(GAMMA + bh * T_Q + offs_m, mask=row_mask, other=0.0)
        p, dp, ds, b, c = _second_order_tiles(q, k, v, do, gq, gk, gv, lse2, delta,
                                              _visible(offs_m, offs_n, T_Q, T_K, WINDOW), SM_SCALE, PRECISION)
        ddp = p * (b - beta[:, None])
        ds_bar = p * ((dp - delta[:, None]) * b - dp * beta[:, None] + c - gamma[:, None])
        acc_k += tl.dot(tl.trans(ds).to(gq.dtype), gq, input_precision=PRECISION)
        acc_k += tl.dot(tl.trans(ds_bar).to(q.dtype), q, input_precision=PRECISION)
        acc_v += tl.dot(tl.trans(ddp).to(do.dtype), do, input_precision=PRECISION)
    _store_tile(OUT_K + kv_base, acc_k * SM_SCALE, offs_n, T_K, offs_d, HEAD_DIM)
    _store_tile(OUT_V + kv_base, acc_v, offs_n, T_K, offs_d, HEAD_DIM)


# ----------------------------------------------------------------------------- launchers


class _Launch:
    """Shapes, tile sizes and compile-time constants shared by every kernel of one call."""

    def __init__(self, q, k, window, scale, blocks, order):
        self.B, self.H, self.T_Q, self.D = q.shape
        self.T_K = k.shape[2]
        # No window, or one past the keys, is plain causal attention: a window of T_K sees all.
        self.window = self.T_K if window is None else min(window, self.T_K)
        bd = block_size(self.D, 16, 256)
        if blocks is not None:
            bm, bn = blocks
        elif interpreting():  # the interpreter's cost is programs x iterations: few, big tiles
            bm = bn = block_size(max(self.T_Q, 16), 16, 64)
        else:  # the second-order kernels hold ~6 score tiles live: smaller tiles keep them in registers
            tiles = {0: (64, 64), 1: (64, 64), 2: (32, 32)} if self.D <= 64 else {0: (64, 32), 1: (32, 32), 2: (16, 32)}
            bm, bn = tiles[order]
        self.block_m, self.block_n = bm, bn
        self.meta = dict(SM_SCALE=float(scale), HEAD_DIM=self.D, ACC=acc_dtype(q.dtype),
                         PRECISION=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4)

    def rows(self):  # one program per query block and head
        return (triton.cdiv(self.T_Q, self.block_m), self.B * self.H)

    def cols(self):  # one program per key block and head
        return (triton.cdiv(self.T_K, self.block_n), self.B * self.H)

    def sizes(self):
        return self.T_Q, self.T_K, self.window


def attention_forward(q, k, v, window, scale, blocks=None):
    run = _Launch(q, k, window, scale, blocks, order=0)
    o = empty(q.shape, q.dtype, q.device)
    lse = empty(q.shape[:3], torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
    swa_fwd_kernel[run.rows()](q, k, v, o, lse, *run.sizes(), **run.meta)
    return o, lse


def attention_backward(q, k, v, o, lse, do, window, scale, blocks=None):
    run = _Launch(q, k, window, scale, blocks, order=1)
    dq, dk, dv = empty(q.shape, q.dtype, q.device), empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    delta = empty(lse.shape, lse.dtype, lse.device)
    swa_bwd_dq_kernel[run.rows()](q, k, v, o, do, lse, delta, dq, *run.sizes(), **run.meta)
    swa_bwd_dkdv_kernel[run.cols()](q, k, v, do, lse, delta, dk, dv, *run.sizes(), **run.meta)
    return dq, dk, dv, delta


def attention_backward_backward(q, k, v, do, lse, delta, gq, gk, gv, window, scale, blocks=None):
    run = _Launch(q, k, window, scale, blocks, order=2)
    beta, gamma = empty(lse.shape, lse.dtype, lse.device), empty(lse.shape, lse.dtype, lse.device)
    args = (q, k, v, do, gq, gk, gv, lse, delta, beta, gamma)
    swa_bwd_bwd_stats_kernel[run.rows()](*args, *run.sizes(), **run.meta)
    out_q, out_do = empty(q.shape, q.dtype, q.device), empty(do.shape, do.dtype, do.device)
    swa_bwd_bwd_dq_kernel[run.rows()](*args, out_q, out_do, *run.sizes(), **run.meta)
    out_k, out_v = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    swa_bwd_bwd_dkdv_kernel[run.cols()](*args, out_k, out_v, *run.sizes(), **run.meta)
    return out_q, out_k, out_v, out_do


# ----------------------------------------------------------------------------- autograd


class SlidingWindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, blocks):
        o, lse = attention_forward(q, k, v, window, scale, blocks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = (window, scale, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        # O and L enter the backward as constants: its own backward differentiates P and Δ as
        # the functions of q, k, v, dO that they are.
        dq, dk, dv = SlidingWindowAttentionBackwardFunction.apply(q, k, v, o.detach(), lse, do, *ctx.meta)
        return dq, dk, dv, None, None, None


class SlidingWindowAttentionBackwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, o, lse, do, window, scale, blocks):
        do = do.contiguous()
        dq, dk, dv, delta = attention_backward(q, k, v, o, lse, do, window, scale, blocks)
        ctx.save_for_backward(q, k, v, do, lse, delta)
        ctx.meta = (window, scale, blocks)
        return dq, dk, dv

    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk, gv):
        q, k, v, do, lse, delta = ctx.saved_tensors
        gq, gk, gv = gq.contiguous(), gk.contiguous(), gv.contiguous()
        out_q, out_k, out_v, out_do = attention_backward_backward(q, k, v, do, lse, delta, gq, gk, gv, *ctx.meta)
        return out_q, out_k, out_v, None, None, out_do, None, None, None


def sliding_window_attention(q, k, v, window: int | None = None, scale: float | None = None,
                             blocks: tuple[int, int] | None = None):
    """Triton counterpart of kernels.attention.sliding_window_attention, twice differentiable.
    `blocks` = (BLOCK_M, BLOCK_N) overrides the tile sizes (tests use it to cross tile edges)."""
    if k.shape[2] < q.shape[2] or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window={window} must be at least 1")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(q, k, v)
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    return SlidingWindowAttentionFunction.apply(q, k, v, window, scale, blocks)
