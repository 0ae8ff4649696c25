"""The optimiser, its schedule and the token-budget arithmetic, shared by every trainer
(pretraining, the RLP/RPT learner, TRL's GRPO) and every pipeline that sizes a run by tokens."""

from __future__ import annotations

import math

import torch

from training.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: norms' gains and other vectors are left alone.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def warmup_cosine(step: int, *, lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at `step`: linear warmup from 0, then cosine down to end_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_lr + 0.5 * (lr - end_lr) * (1 + math.cos(math.pi * progress))


def steps_for_tokens(tokens: float, tokens_per_step: float) -> int:
    """The optimizer steps that consume `tokens` data tokens at tokens_per_step each (at least one;
    the last step may read past the budget)."""
    return max(1, math.ceil(tokens / tokens_per_step))
