"""TTT-E2E's inner loop (methods.md §4): the suffix blocks' fast MLPs train on the context as the
model reads it.

The prefix blocks run once over the whole input. The suffix then scans chunks of b tokens
(`mini_batch_size`, aligned to absolute positions 0, b, 2b, ...): chunk i is predicted with the
fast weights W_{i-1}, then

    W_i = W_{i-1} - η · clip_{global norm ≤ 1}(∇_W ℓ_i(W_{i-1}))

where ℓ_i is the mean next-token loss of chunk i computed at the network's end (the rest of the
suffix, final norm, tied head), and the clip is taken jointly over the fast weights of all suffix
layers, separately for every sequence. With `ttt_grad="second_order"` the outer gradient flows
through every update (gradients of gradients) to W_0 and to the slow weights; "first_order"
treats each inner gradient as a constant.

Training calls this without a state (fast weights start at W_0, with their graph). Decoding passes
a DecodeState and feeds any number of tokens at a time: a chunk that fills is learned from as
soon as its last target (the next token) arrives, recomputing the chunk if its graph is gone, so
step-by-step decoding gives the logits of one forward over the whole sequence.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from models.state import DecodeState


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of every sequence over its targets that are not -100. [B]"""
    ce = F.cross_entropy(upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100, reduction="none")
    valid = (targets != -100).to(ce.dtype)
    return (ce.view(targets.shape) * valid).sum(1) / valid.sum(1).clamp(min=1)


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale every sequence's gradients (leading dim B) so their joint norm is at most max_norm."""
    sq = sum(g.pow(2).flatten(1).sum(1) for g in grads)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return [g * scale.view(-1, *([1] * (g.dim() - 1))) for g in grads]


def inner_sgd_step(fast: list[list[torch.Tensor]], loss: torch.Tensor, lr: float, max_norm: float,
                   create_graph: bool, retain_graph: bool) -> list[list[torch.Tensor]]:
    """One clipped SGD step of every sequence's fast weights on its own loss ([B]).
    create_graph: differentiate through the gradient (second order); retain_graph: the outer
    backward still needs the chunk's graph (first order in training)."""
    flat = [w for layer in fast for w in layer]
    # Each sequence's loss depends only on its own row of W, so one grad of the sum gives every
    # sequence its own gradient.
    grads = torch.autograd.grad(loss.sum(), flat, create_graph=create_graph, retain_graph=retain_graph or create_graph)
    grads = clip_by_global_norm(list(grads), max_norm)
    new = iter([w - lr * g for w, g in zip(flat, grads)])
    return [[next(new) for _ in layer] for layer in fast]


def initial_fast_weights(model, batch_size: int) -> list[list[torch.Tensor]]:
    """W_0, one (broadcast) copy per sequence, still attached to the parameters' graph."""
    return [[w.unsqueeze(0).expand(batch_size, *w.shape) for w in block.fast_mlp.f.weights()]
            for block in model.blocks[model.n_prefix:]]


def ttt_forward(model, input_ids: torch.Tensor, targets: torch.Tensor | None, state: DecodeState | None):
    """Logits [B, T, V] of a TTT-E2E model; reads and advances `state` when given."""
    cfg = model.config
    B, T = input_ids.shape
    b, P, window = cfg.mini_batch_size, model.n_prefix, cfg.sliding_window
    outer_grad = torch.is_grad_enabled() and state is None  # training: keep the graph to the slow weights
    second_order = outer_grad and cfg.ttt_grad == "second_order"
    if state is None:
        state = DecodeState(kv=[None] * cfg.num_hidden_layers, fast=initial_fast_weights(model, B))
    start = state.pos

    h = model.run_blocks(model.blocks[:P], model.embed(input_ids), start, state)
    state.trim(range(P), window)

    # Next-token targets of every position; the last one only the caller can know.
    last = targets[:, -1:] if targets is not None else torch.full_like(input_ids[:, :1], -100)
    inner_targets = torch.cat([input_ids[:, 1:], last], dim=1)

    def learn_pending(next_ids: torch.Tensor) -> None:
        """Update the fast weights on the full pending chunk, whose last target is next_ids."""
        chunk_targets = torch.cat([state.pending_ids[:, 1:], next_ids[:, None]], dim=1)
        loss = state.pending_loss
        if not state.learn:
            state.trim(range(P, cfg.num_hidden_layers), window)
            state.pending_h = state.pending_ids = state.pending_loss = None
            return
        with torch.enable_grad():
            if loss is None:  # recompute the chunk as it was first computed
                fast = state.fast if outer_grad else _leaves(state.fast)
                scratch = DecodeState(kv=[None] * P + [(k[:, :, :-b], v[:, :, :-b]) for k, v in state.kv[P:]])
                out = model.run_blocks(model.blocks[P:], state.pending_h, state.chunk_start, scratch, P, fast)
                loss, state.fast = per_sequence_loss(model.lm_head(out), chunk_targets), fast
            new_fast = inner_sgd_step(state.fast, loss, model.inner_lr, cfg.ttt_clip, create_graph=second_order,
                                      retain_graph=outer_grad)
        if not outer_grad:  # inference: drop the graph of the step just taken
            new_fast = [[w.detach() for w in layer] for layer in new_fast]
            state.kv[P:] = [(k.detach(), v.detach()) for k, v in state.kv[P:]]
        state.fast = new_fast
        state.trim(range(P, cfg.num_hidden_layers), window)
        state.pending_h = state.pending_ids = state.pending_loss = None

    logits = []
    i = 0
    while i < T:
        if state.pending_len == b:
            learn_pending(input_ids[:, i])
        if state.pending_len == 0:
            state.chunk_start = start + i
        j = min(T, i + b - state.pending_len)
        # A whole chunk read in one call is learned from with the graph of this very forward,
        # so the suffix runs once per chunk in training; that needs its last target at hand.
        whole = state.pending_len == 0 and j - i == b and (j < T or targets is not None)
        grad_ctx = torch.enable_grad() if whole else contextlib.nullcontext()
        with grad_ctx:
            fast = state.fast if (outer_grad or not whole) else _leaves(state.fast)
            out = model.run_blocks(model.blocks[P:], h[:, i:j], start + i, state, P, fast)
            piece_logits = model.lm_head(out)
            state.fast = fast
            state.pending_loss = per_sequence_loss(piece_logits, inner_targets[:, i:j]) if whole else None
        logits.append(piece_logits if outer_grad else piece_logits.detach())
        state.pending_h = h[:, i:j] if state.pending_h is None else torch.cat([state.pending_h, h[:, i:j]], 1)
        state.pending_ids = input_ids[:, i:j] if state.pending_ids is None else torch.cat([state.pending_ids, input_ids[:, i:j]], 1)
        i = j
    state.pos = start + T
    return torch.cat(logits, dim=1)


def _leaves(fast: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Fast weights as fresh leaves that track gradients (inference needs the inner gradient only)."""
    return [[w.detach().requires_grad_() for w in layer] for layer in fast]
