"""The learner's losses (methods.md §1): RLP's clipped surrogate over thought tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.rollouts import ThoughtSample


def thought_batch(samples: list[ThoughtSample], think_open: int, pad_id: int):
    """Right-padded [N, L] sequences context + <think> + thought, and a [N, L] mask of the
    positions whose NEXT token is a thought token (where the policy gradient applies), with the
    old log-probs and advantages laid out on the same grid."""
    seqs = [s.context + [think_open] + s.thought for s in samples]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    old = torch.zeros(len(seqs), L)
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        ids[i, : len(seq)] = torch.tensor(seq)
        first = len(s.context)  # the logits at <think> predict the first thought token
        mask[i, first : first + len(s.thought)] = True
        old[i, first : first + len(s.thought)] = torch.tensor(s.old_logprobs)
    advantages = torch.tensor([s.advantage for s in samples])
    return ids, mask, old, advantages


def rlp_policy_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, temperature: float, clip_low: float, clip_high: float,
                    is_cap: float = float("inf")):
    """L = -(1/N) Σ_i (1/|c_i|) Σ_u min(ρ_u A_i, clip(ρ_u, 1-ε_low, 1+ε_high) A_i), over thought
    tokens u only; ρ_u = min(π_θ / π_old, is_cap) at the sampling temperature, π_old the policy
    that sampled the thought (one version behind with asynchronous rollouts): the cap bounds what
    a stale token can weigh where A < 0, which the PPO clip leaves unbounded. Returns (loss, stats)."""
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # token each position predicts (last: unused)
    logp = F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, next_ids[..., None])[..., 0]
    ratio = torch.exp((logp - old_logprobs).masked_fill(~mask, 0.0)).clamp(max=is_cap)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    per_thought = (surrogate * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = -per_thought.mean()
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)) & mask
        stats = {"rlp/clip_frac": (clipped.sum() / mask.sum().clamp(min=1)).item(),
                 "rlp/ratio_mean": (ratio * mask).sum().item() / max(mask.sum().item(), 1)}
    return loss, stats
