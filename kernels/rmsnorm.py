"""RMSNorm: the plain-torch path and reference.

    y = (xf · rsqrt(mean(xf², -1) + eps)).to(x.dtype) · weight

x [..., d], weight [d]; xf is x upcast to at least float32 (float64 stays float64). The normalised
value is rounded to x.dtype before the multiply, so y has torch's promotion of x.dtype and
weight.dtype (under bf16 autocast: bf16 x, float32 weight, float32 y).
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
