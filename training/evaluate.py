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
                device: str | torch.device = "cpu") -> dict[str, float]:
    """windows: [N, T+1] held-out token windows; token_bytes: [V] bytes per token id."""
    was_training = model.training
    model.eval()
    nats, n_bytes, n_tokens = 0.0, 0, 0
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
    model.train(was_training)
    return {"eval/bpb": nats / (math.log(2) * max(n_bytes, 1)), "eval/loss": nats / max(n_tokens, 1)}
