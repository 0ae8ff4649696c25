"""TTT-E2E's inner loop (methods.md §4): the suffix blocks' fast MLPs train on the context as the
model reads it.

The prefix blocks run once over the whole input. The suffix then scans chunks of b tokens
(`mini_batch_size`, aligned to absolute positions 0, b, 2b, ...): chunk i is predicted with the
fast weights W_{i-1}, then

    W_i = W_{i-1} - η · clip_{global norm ≤ 1}(∇_W ℓ_i(W_{i-1}))

where ℓ_i is the masked mean next-token loss of chunk i computed at the network's end (the rest
of the suffix, final norm, head), sum(nll · mask) / max(sum(mask), 1), and the clip is taken jointly over the fast weights of all suffix
layers, separately for every sequence. With `ttt_grad="second_order"` the outer gradient flows
through every update (gradients of gradients) to W_0 and to the slow weights; "first_order"
treats each inner gradient as a constant.

Training calls this without a state (fast weights start at W_0, with their graph), or with a
differentiable one carried from earlier windows (training/carry.py). Decoding passes
a DecodeState and feeds any number of tokens at a time: a chunk that fills is learned from as
soon as its last target (the next token) arrives, recomputing the chunk if its graph is gone, so
step-by-step decoding gives the logits of one forward over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from kernels import clipped_sgd, linear_cross_entropy, resolve_backend
from models.state import UNKNOWN, DecodeState, map_tensors


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of every sequence over its targets that are not -100. [B]"""
    ce = F.cross_entropy(upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100, reduction="none")
    valid = (targets != -100).to(ce.dtype)
    return (ce.view(targets.shape) * valid).sum(1) / valid.sum(1).clamp(min=1)


def chunk_mean_loss(logits: torch.Tensor, targets: torch.Tensor, chunk: int, start: int = 0) -> torch.Tensor:
    """TTT-E2E's outer loss: for every sequence the unweighted mean, over its chunks of `chunk`
    tokens (aligned to absolute positions 0, chunk, ...; `start` is the first position's), of each
    chunk's masked mean loss (a chunk with every target masked counts as 0); then the mean over
    sequences. Equals the token mean only when nothing is masked and every chunk is full."""
    B, T = targets.shape
    ce = F.cross_entropy(upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100, reduction="none")
    valid = (targets != -100).to(ce.dtype)
    lead = start % chunk
    n = -(-(lead + T) // chunk)
    pad = (lead, n * chunk - lead - T)
    ce, valid = F.pad(ce.view(B, T), pad).view(B, n, chunk), F.pad(valid, pad).view(B, n, chunk)
    return ((ce * valid).sum(-1) / valid.sum(-1).clamp(min=1)).mean()


def inner_loss(model, hidden: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """per_sequence_loss of a chunk. With Triton kernels the head (tied or not) is recomputed in row chunks
    inside one twice-differentiable op (kernels/triton_linear_ce.py), so the inner gradient's graph
    keeps no [tokens, vocab] tensor; the logits are still made once, for the caller."""
    if resolve_backend(model.config.kernels, hidden.device) != "triton":
        return per_sequence_loss(logits, targets)
    ce = linear_cross_entropy(model.norm(hidden), model.output_weight, targets, backend="triton")
    valid = (targets != -100).to(ce.dtype)
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


def inner_grads(weights: list[torch.Tensor], loss: torch.Tensor, create_graph: bool, retain_graph: bool):
    """Every sequence's gradient of its own loss ([B]) with respect to its fast weights (leading dim B).
    create_graph: differentiate through the gradient (second order); retain_graph: the outer
    backward still needs the chunk's graph (first order in training)."""
    # Each sequence's loss depends only on its own row of W, so one grad of the sum gives every
    # sequence its own gradient.
    return list(torch.autograd.grad(loss.sum(), weights, create_graph=create_graph,
                                    retain_graph=retain_graph or create_graph))


def inner_sgd_step(fast: list[list[torch.Tensor]], loss: torch.Tensor, lr: float, max_norm: float,
                   create_graph: bool, retain_graph: bool, kernels: str = "torch") -> list[list[torch.Tensor]]:
    """One clipped SGD step of every sequence's fast weights on its own loss ([B])."""
    flat = [w for layer in fast for w in layer]
    new = iter(clipped_sgd(flat, inner_grads(flat, loss, create_graph, retain_graph), lr, max_norm, kernels))
    return [[next(new) for _ in layer] for layer in fast]


def single_level_update(model, fast: list[list[torch.Tensor]], memory, loss: torch.Tensor, chunk_end: int,
                        create_graph: bool, retain_graph: bool):
    """TTT-E2E's inner update after every chunk (ttt_forward's default `update`). `memory` is what an
    update carries between chunks besides the fast weights (none here; see models/memory.py), and
    `chunk_end` the position after the chunk's last token."""
    cfg = model.config
    return inner_sgd_step(fast, loss, model.inner_lr, cfg.ttt_clip, create_graph, retain_graph, cfg.kernels), memory


def initial_fast_weights(model, batch_size: int) -> list[list[torch.Tensor]]:
    """W_0, one (broadcast) copy per sequence, still attached to the parameters' graph."""
    return [[w.unsqueeze(0).expand(batch_size, *w.shape) for w in block.fast_weights()]
            for block in model.blocks[model.n_prefix:]]


def chunk_step(model, h: torch.Tensor, start: int, past_kv: list, fast: list[list[torch.Tensor]], memory,
               targets: torch.Tensor | None, second_order: bool, retain_graph: bool, update=single_level_update):
    """Predict one chunk with the fast weights `fast`, then (given its targets) take the inner
    step on it with `update`. A pure function of its inputs, so it can be recomputed in the
    backward. Returns logits, the new fast weights and update memory, and the suffix keys/values
    [past; chunk]."""
    P = model.n_prefix
    # This chunk's own handle on the weights: the inner gradient is the one of this chunk's forward,
    # the keys and values of earlier chunks held fixed, even where a weight (a slow level of
    # continuum memory) is the very tensor that computed them.
    fast = [[w.view_as(w) for w in layer] for layer in fast]
    scratch = DecodeState(kv=[None] * P + list(past_kv))
    hidden = model.run_blocks(model.blocks[P:], h, start, scratch, P, fast)
    logits = model.lm_head(hidden)
    if targets is not None:
        fast, memory = update(model, fast, memory, inner_loss(model, hidden, logits, targets), start + h.shape[1],
                              second_order, retain_graph)
    return logits, fast, memory, scratch.kv[P:]


def ttt_forward(model, input_ids: torch.Tensor, targets: torch.Tensor | None, state: DecodeState | None,
                update=single_level_update):
    """Logits [B, T, V] of a TTT-E2E model; reads and advances `state` when given. `update` is the
    inner update after each chunk (single_level_update, or continuum memory's)."""
    cfg = model.config
    B, T = input_ids.shape
    b, P, L, window = cfg.mini_batch_size, model.n_prefix, cfg.num_hidden_layers, cfg.sliding_window
    # training (no state, or a differentiable one): keep the graph to the slow weights
    outer_grad = torch.is_grad_enabled() and (state is None or state.differentiable)
    second_order = outer_grad and cfg.ttt_grad == "second_order"
    continued = state is not None  # will the caller read on from where this call stops?
    if state is None:
        state = DecodeState(kv=[None] * L, fast=initial_fast_weights(model, B))
    start = state.pos

    h = model.run_blocks(model.blocks[:P], model.embed(input_ids), start, state)
    state.trim(range(P), window)

    # The inner loop's target of every position: the caller's (masks included), else the next
    # input, the last of which arrives with the next call.
    # (Given targets are all known: nothing then waits on the host, so a training step can be
    # captured in a CUDA graph.)
    last_known = targets is not None
    if targets is None:
        targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], UNKNOWN)], dim=1)
    state.resolve_pending_target(input_ids[:, :1])

    def step(h_chunk, chunk_start, past_kv, chunk_targets):
        """chunk_step, with the graph handling of training or of inference around it."""
        if outer_grad:
            args = (model, h_chunk, chunk_start, past_kv, state.fast, state.memory, chunk_targets, second_order, True,
                    update)
            if cfg.ttt_recompute:  # keep only the chunk's inputs; rebuild its graph in the backward
                return torch.utils.checkpoint.checkpoint(chunk_step, *args, use_reentrant=False)
            return chunk_step(*args)
        with torch.enable_grad():  # inference still needs the inner gradient, nothing more
            # Fast weights as fresh leaves that track gradients: inference needs the inner gradient only.
            leaves = map_tensors(lambda w: w.detach().requires_grad_(), state.fast)
            out = chunk_step(model, h_chunk, chunk_start, past_kv, leaves, state.memory, chunk_targets, False, False,
                             update)
        return map_tensors(torch.Tensor.detach, out)  # logits, fast weights, memory, keys/values

    logits = []
    i = 0
    while i < T:
        if state.pending_len == b:
            # A chunk read piecewise (decoding) is complete and its last target has arrived:
            # recompute it with the weights that predicted it, and learn from it.
            if state.learn:
                past = [(k[:, :, :-b], v[:, :, :-b]) for k, v in state.kv[P:]]
                _, state.fast, state.memory, _ = step(state.pending_h, state.chunk_start, past, state.pending_targets)
            state.trim(range(P, L), window)
            state.pending_h = state.pending_targets = None
        if state.pending_len == 0:
            state.chunk_start = start + i
        j = min(T, i + b - state.pending_len)
        if state.pending_len == 0 and j - i == b and (last_known or j < T or not (targets[:, j - 1] == UNKNOWN).any()):
            # A whole chunk whose last target is known: predict and learn from it in one go
            # (not the final chunk of a call nobody continues: those weights would go unused).
            learn = state.learn and (j < T or continued)
            chunk_targets = targets[:, i:j] if learn else None
            piece_logits, state.fast, state.memory, kv = step(h[:, i:j], start + i, state.kv[P:], chunk_targets)
            state.kv[P:] = kv
            state.trim(range(P, L), window)
        else:
            piece_logits = model.lm_head(model.run_blocks(model.blocks[P:], h[:, i:j], start + i, state, P, state.fast))
            state.pending_h = _append(state.pending_h, h[:, i:j])
            state.pending_targets = _append(state.pending_targets, targets[:, i:j])
        logits.append(piece_logits)
        i = j
    state.pos = start + T
    return torch.cat(logits, dim=1)


def _append(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)
