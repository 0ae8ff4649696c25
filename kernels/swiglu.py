"""SwiGLU with weights shared by the batch ([I, d]) or one set per sequence ([B, I, d]): the
plain-torch path and reference. Per-sequence weights are TTT-E2E's fast weights: every sequence
trains its own copy on its own context.

x: [B, T, d]; w1, w3: [(B,) I, d]; w2: [(B,) d, I]  ->  [B, T, d]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    if w1.dim() == 2:
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    gate = torch.bmm(x, w1.transpose(1, 2))
    up = torch.bmm(x, w3.transpose(1, 2))
    return torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))
