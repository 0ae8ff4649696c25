"""Rotary position embedding, rotate-half convention (the torch reference of kernels/triton_rope.py).

    rotated = cat(-x[..., D/2:], x[..., :D/2]);   out = x ∘ cos + rotated ∘ sin

cos and sin ([T, D] from models.model.rope_cos_sin, or anything that broadcasts against x) are
constants made from the positions. The result has torch's promoted dtype of x, cos and sin.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
