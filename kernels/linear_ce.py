"""Per-token cross-entropy of a linear head: the plain-torch path and reference.

    losses = linear_cross_entropy(hidden [N, d], weight [V, d], targets [N])  ->  [N]

losses[i] = logsumexp(hidden[i] Wᵀ) - (hidden[i] Wᵀ)[targets[i]], and 0 where targets[i] is -100.
The logits are computed in the matmul's dtype and the softmax in at least float32. This path
materialises the [N, V] logits (and autograd keeps them); the Triton path
(kernels/triton_linear_ce.py) does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
