"""Held-out evaluation: bits per byte on original documents.

bpb = (sum of next-token losses in nats) / (ln 2 · UTF-8 bytes those tokens stand for), over the
targets that are text (special tokens such as the end-of-document separator stand for no bytes
and are left out of both sums). Unlike loss per token, it compares across tokenizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def heldout_bpb(model, windows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int = 16,
                device: str | torch.device = "cpu", position_buckets: int = 8) -> dict:
    """windows: [N, T+1] held-out token windows; token_bytes: [V] bytes per token id.

    Also eval/loss_by_position: the mean loss in `position_buckets` equal spans of the window,
    earliest first (with TTT-E2E it falls along the window as the fast weights learn).
    A TTT-E2E model runs its inner loop here, as at test time."""
    was_training = model.training
    model.eval()
    nats, n_bytes, n_tokens = 0.0, 0, 0
    seq_len = windows.shape[1] - 1
    pos_nats, pos_count = torch.zeros(seq_len), torch.zeros(seq_len)
    token_bytes = token_bytes.to(device)
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        logits = model(w[:, :-1]).logits
        targets = w[:, 1:]
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        counts = token_bytes[targets.flatten()]
        is_text = counts > 0
        nats += losses[is_text].sum().item()
        n_bytes += counts.sum().item()
        n_tokens += is_text.sum().item()
        text_losses = (losses * is_text).view(targets.shape).cpu()
        pos_nats += text_losses.sum(0)
        pos_count += is_text.view(targets.shape).sum(0).cpu()
    model.train(was_training)
    by_position = [(n.sum() / c.sum().clamp(min=1)).item()
                   for n, c in zip(pos_nats.chunk(position_buckets), pos_count.chunk(position_buckets))]
    return {"eval/bpb": nats / (math.log(2) * max(n_bytes, 1)), "eval/loss": nats / max(n_tokens, 1),
            "eval/loss_by_position": by_position}
