"""TTT-E2E's inner step, w - lr · clip_{global norm ≤ max_norm}(g): the plain-torch path and the
reference kernels/triton_sgd.py is held to.

Every tensor has the sequence as its leading dim B; the clip is joint over all of a sequence's
tensors (all suffix layers' fast weights, every memory level's): scale[b] = min(1, max_norm /
(‖g[b]‖ + 1e-6)).
"""

from __future__ import annotations

import torch


def clip_scale(sq_norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """min(1, max_norm / (‖g‖ + eps)) per sequence from squared norms [B]. A zero gradient (a chunk
    whose every target is masked) gets scale 1 with a finite gradient: sqrt's derivative at 0 is
    infinite and would turn the second-order meta-gradient into NaN."""
    norm = torch.where(sq_norm > 0, sq_norm, torch.ones_like(sq_norm)).sqrt()
    return torch.where(sq_norm > 0, (max_norm / (norm + eps)).clamp(max=1.0), torch.ones_like(norm))


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale every sequence's gradients (leading dim B) so their joint norm is at most max_norm."""
    scale = clip_scale(sum(g.pow(2).flatten(1).sum(1) for g in grads), max_norm)
    return [g * scale.view(-1, *([1] * (g.dim() - 1))) for g in grads]


def clipped_sgd_step(weights: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
                     max_norm: float) -> list[torch.Tensor]:
    """w - lr · clip_{global norm ≤ max_norm}(g), per sequence."""
    return [w - lr * g for w, g in zip(weights, clip_by_global_norm(grads, max_norm))]
