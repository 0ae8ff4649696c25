"""Continuum memory (Nested Learning's CMS, methods.md §5): fast weights at several frequencies.

Every suffix block chains k fast MLPs after its attention, fastest level first (models/model.py,
Block: fast_mlp, then memory_mlps): level l reads the residual stream that level l-1 wrote. Level
l has a chunk size C_l (`cms_chunk_sizes`, strictly increasing multiples of the base chunk b =
`mini_batch_size`) and changes only at the end of each of its spans [n·C_l, (n+1)·C_l):

    W^l <- W^l - η_l · clip_{global norm ≤ 1}( (1 / (C_l/b)) · Σ_{chunks i of the span} ∇_{W^l} ℓ_i )

where ℓ_i is TTT-E2E's inner loss of base chunk i (its masked mean next-token loss at the network's
end), computed as the chunk was predicted: with the fast weights every level had then. So a level
takes one step on its span's loss, the unweighted mean of its chunks' losses (Nested Learning's
Σ_t η ∇f(θ_t; x_t) over the span, θ constant within it), and never sees a chunk before that chunk
was predicted. The clip is joint over the suffix layers, per level and per sequence. Each level's
W_0 is an ordinary parameter, and the outer gradient flows through every update of every level
(second order, as TTT-E2E).

The scan over base chunks, the decoding state and the recomputation are TTT-E2E's (models/ttt.py);
this module supplies the inner update. Between its updates a slower level keeps the running sum of
its chunks' gradients (DecodeState.memory), weight-sized, so no level materialises more than
TTT-E2E does: one backward per base chunk gives the gradients of all levels at once.
"""

from __future__ import annotations

import torch

from kernels import clipped_sgd
from models.ttt import inner_grads, single_level_update


def level_update(model, fast: list[list[torch.Tensor]], memory: list | None, loss: torch.Tensor, chunk_end: int,
                 create_graph: bool, retain_graph: bool):
    """After a base chunk ending at position `chunk_end`: add its gradient to every level's sum, and
    step each level whose span ends there. fast[layer] = [w1, w2, w3 of level 0, of level 1, ...];
    memory[l]: level l's gradient sum over its span so far, flat over layers (None: nothing yet)."""
    cfg = model.config
    k, n_layers = len(cfg.cms_chunk_sizes), len(fast)
    flat = [w for layer in fast for w in layer]
    grads = inner_grads(flat, loss, create_graph, retain_graph)
    memory = memory or [None] * k
    warm = model.inner_lr / cfg.ttt_inner_lr  # the inner-lr warmup scales every level alike
    new_flat, new_memory = list(flat), []
    for level, (size, lr) in enumerate(zip(cfg.cms_chunk_sizes, cfg.level_inner_lrs)):
        idx = [layer * 3 * k + 3 * level + j for layer in range(n_layers) for j in range(3)]
        g = [grads[i] for i in idx]
        if memory[level] is not None:
            g = [s + gi for s, gi in zip(memory[level], g)]
        if chunk_end % size:
            new_memory.append(g)
            continue
        chunks = size // cfg.mini_batch_size
        if chunks > 1:
            g = [gi / chunks for gi in g]
        for i, w in zip(idx, clipped_sgd([flat[i] for i in idx], g, lr * warm, cfg.ttt_clip, cfg.kernels)):
            new_flat[i] = w
        new_memory.append(None)
    new = iter(new_flat)
    return [[next(new) for _ in layer] for layer in fast], new_memory


def inner_update(config):
    """The inner update a model of this config runs after every base chunk."""
    return level_update if config.cms_chunk_sizes else single_level_update
