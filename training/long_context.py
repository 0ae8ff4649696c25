"""Memory beyond the window: a long document streamed through consecutive windows, with or without
the model's state carried from one window to the next (ttt.carry_state).

Carried, every sequence keeps one DecodeState across windows: the attention cache (the last
`sliding_window` keys with SWA and TTT-E2E; every key with full attention) and every level's fast
weights, so streaming equals one forward over the whole document. Not carried, every window
starts afresh: from W_0, with an empty cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.hf import is_ponder, is_ttt
from training.data import split_window


@torch.no_grad()
def stream_losses(model, stream: torch.Tensor, window: int, carry: bool, boundary_id: int | None = None) -> torch.Tensor:
    """Next-token loss (nats) of every target of `stream` ([B, N+1] tokens, each row one long
    document), read in consecutive windows of `window` tokens. [B, N]."""
    if carry and not is_ponder(model):
        raise ValueError("carrying state across windows needs a Ponder model (its DecodeState)")
    inputs, targets = split_window(stream, boundary_id)
    state = model.new_state(stream.shape[0]) if carry else None
    losses = []
    for start in range(0, inputs.shape[1], window):
        ids, tgt = inputs[:, start : start + window], targets[:, start : start + window]
        # A TTT-E2E model learns from the targets evaluation may show it (boundaries masked), as in training.
        logits = model(ids, targets=tgt if is_ttt(model) else None, state=state).logits
        true = stream[:, 1 + start : 1 + start + ids.shape[1]]
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), true.flatten(), reduction="none").view(true.shape))
    return torch.cat(losses, 1)


def loss_by_position(model, documents: list[list[int]], length: int, window: int, carry: bool, batch_size: int = 8,
                     device: str | torch.device = "cpu") -> list[float]:
    """Mean loss at every position 0..length-1 over the documents of at least length+1 tokens
    (each cut to its first length+1)."""
    rows = torch.tensor([d[: length + 1] for d in documents if len(d) > length], dtype=torch.long)
    if len(rows) == 0:
        raise ValueError(f"no document has more than {length} tokens")
    was_training = model.training
    model.eval()
    total = torch.zeros(length, dtype=torch.float64)
    for i in tqdm(range(0, len(rows), batch_size), desc=f"loss by position (carry={carry})", leave=False):
        total += stream_losses(model, rows[i : i + batch_size].to(device), window, carry).double().sum(0).cpu()
    model.train(was_training)
    return (total / len(rows)).tolist()


def log_buckets(length: int, first: int = 1) -> list[tuple[int, int]]:
    """Spans [a, b) of positions, doubling from `first` (with [0, first) before them): the log-x
    axis of loss by position."""
    spans, a = [(0, first)], first
    while a < length:
        spans.append((a, min(length, 2 * a)))
        a *= 2
    return spans


def bucketed(losses: list[float], spans: list[tuple[int, int]]) -> list[float]:
    return [sum(losses[a:b]) / (b - a) for a, b in spans]


def write_curves(path: str | Path, curves: dict[str, dict]) -> Path:
    """long_context.json: {run: {"carry": bool, "window": W, "positions": [...], "loss": [...]}}."""
    path = Path(path)
    path.write_text(json.dumps(curves, indent=1))
    return path


def mean_beyond(curve: dict, start: int) -> float:
    """Mean loss over the positions >= start (e.g. beyond the sliding window)."""
    xs, ys = curve["positions"], curve["loss"]
    pairs = [(b - a, y) for (a, b), y in zip(xs, ys) if a >= start]
    weight = sum(w for w, _ in pairs)
    return sum(w * y for w, y in pairs) / weight if weight else math.nan


def measure(model, documents: list[list[int]], length: int, window: int, name: str, device) -> dict[str, dict]:
    """The run's loss by position, with and without carried state, bucketed on a log axis."""
    spans = log_buckets(length, first=8)
    out = {}
    for carry in (False, True):
        losses = loss_by_position(model, documents, length, window, carry, device=device)
        out[f"{name}{' +carry' if carry else ''}"] = {"carry": carry, "window": model.config.sliding_window,
                                                      "positions": spans, "loss": bucketed(losses, spans)}
    return out
