"""Causal attention, full or sliding-window: the plain-torch path.

A query at position i sees keys j with  i - window < j <= i  (the window counts the query's own
position). `window=None`, or a window at least the key length, is full causal attention.
q: [B, H, Tq, D]; k, v: [B, H, Tk, D], with the queries aligned to the LAST Tq keys (so a decode
step with a cache of Tk - Tq earlier keys uses the same function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sliding_window_mask(t_q: int, t_k: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean [t_q, t_k] mask, True where the query may attend."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


# Up to this many queries, attention is computed with materialised scores: fused attention kernels
# tile 64 queries at a time, so a decode step's single query leaves one tile per head and the GPU
# nearly idle (seen on an H200: 0.4 ms per layer for one query over 2K keys), while its scores
# are only [B, H, few, keys].
FEW_QUERIES = 16


def masked_attention(q, k, v, mask: torch.Tensor, scale: float | None = None):
    """softmax(q kᵀ · scale, masked) v, with mask broadcast to [B, H, Tq, Tk] (True: attend)."""
    if q.shape[-2] > FEW_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).mul_(scale).masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def sliding_window_attention(q, k, v, window: int | None = None, scale: float | None = None):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if (window is None or window >= t_k) and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return masked_attention(q, k, v, sliding_window_mask(t_q, t_k, window, device=q.device), scale)


def sliding_window_attention_reference(q, k, v, window: int | None = None, scale: float | None = None):
    """Materialised scores and softmax: slow, but every op has a double backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = sliding_window_mask(q.shape[-2], k.shape[-2], window, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return probs.to(q.dtype) @ v
