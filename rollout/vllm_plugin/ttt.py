"""TTT-E2E's fast MLPs inside vLLM: every request keeps its own fast weights, updated as
models/ttt.py defines them, in vLLM's per-request state cache (the one its Mamba layers use).

Per request and suffix block the state holds the block's fast weights w1, w2, w3; the first
suffix block also keeps the chunk read since the last inner update (the hidden states entering
its fast MLP, their token ids), and every later one the keys and values its attention made over
the last `window + b` positions. Chunks are aligned to absolute positions 0, b, 2b, ...
(b = mini_batch_size). When a request's step starts at a position p = k·b (k ≥ 1), the chunk
[p−b, p) has all its targets (the last one is the token at p), so before anything else the fast
weights of every suffix block take one clipped SGD step, the clip joint over the blocks, on the
chunk's mean next-token loss taken at the network's end. That is models/ttt.py's update, which
step-by-step decoding and one forward over the whole sequence both make.

The update recomputes the chunk through the suffix with gradients: the first suffix block from
its stored inputs, every later block's attention over the chunk's own keys (recomputed) and the
stored keys of the window before it (fixed, as they were made). The stored keys duplicate a
window of vLLM's paged cache for those blocks; reading the paged cache instead would tie the
update to each attention backend's cache layout.

Fast weights are constant within one forward only if no request's step crosses a chunk
boundary: rollout/vllm_plugin/scheduler.py cuts prefills there, and the model checks it.

vLLM runs the forward in inference mode; the inner gradient runs in a normal-mode island on
clones of the state (inference tensors cannot be saved for backward), with plain torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from kernels import fast_swiglu
from models.config import PonderConfig
from models.model import Sublayer, SwiGLU

N_STATES = 7  # w1, w2, w3, the pending chunk's hidden states, its token ids, past keys, past values


def past_len(config: PonderConfig) -> int:
    """Positions of keys a later suffix block keeps: the window before a chunk, and the chunk."""
    return config.attention_window + config.mini_batch_size if config.suffix_len > 1 else 1


def fast_state_shapes(config: PonderConfig) -> tuple[tuple[int, ...], ...]:
    """Shapes of one request's state of one suffix block (no leading request dimension). Every
    suffix block has the same shapes (vLLM pages them alike); each uses the parts it needs."""
    d, width, b = config.hidden_size, config.mlp_width, config.mini_batch_size
    kv = config.num_key_value_heads * config.head_dim
    return (width, d), (d, width), (width, d), (b, d), (b,), (past_len(config), kv), (past_len(config), kv)


def fast_state_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    return dtype, dtype, dtype, dtype, torch.int32, dtype, dtype


@dataclass
class RequestBatch:
    """The requests of one vLLM forward, in its token order (one-token requests first)."""

    slots: list[int]  # each request's state index
    starts: list[int]  # each request's first token in the flat batch, and the end
    first_pos: list[int]  # position of each request's first token
    num_decodes: int
    token_slots: torch.Tensor  # [tokens] the state index of every token's request

    @classmethod
    def of(cls, layer_name: str, positions: torch.Tensor) -> RequestBatch | None:
        """The batch as vLLM's metadata for `layer_name` describes it; None in vLLM's warm-up
        and profiling runs, which have no requests."""
        meta = get_forward_context().attn_metadata
        meta = meta.get(layer_name) if isinstance(meta, dict) else None
        if meta is None:
            return None
        n = meta.num_prefills + meta.num_decodes
        starts = meta.query_start_loc[: n + 1].tolist()
        if starts[meta.num_decodes] != meta.num_decodes:
            raise RuntimeError(f"expected the {meta.num_decodes} one-token requests first; query starts {starts}")
        slots = meta.state_indices_tensor[:n]
        lengths = torch.tensor(starts[1:], device=slots.device) - torch.tensor(starts[:-1], device=slots.device)
        return cls(slots.tolist(), starts, positions[starts[:-1]].tolist(), meta.num_decodes,
                   slots.long().repeat_interleave(lengths))

    def lengths(self) -> list[int]:
        return [j - i for i, j in zip(self.starts[:-1], self.starts[1:])]


class FastMLP(Sublayer, MambaBase):
    """A suffix block's fast MLP sublayer, x -> post_norm(SwiGLU(pre_norm(x); W)), with W the
    request's own fast weights. Its parameters are W_0 (models.model's fast_mlp, name for name).
    It owns the block's per-request state; `keeps_chunk`: the first suffix block's, which stores
    the pending chunk; `keeps_keys`: a later one's, which stores its attention's past keys."""

    def __init__(self, config: PonderConfig, vllm_config: VllmConfig, prefix: str, first: bool):
        op = lambda x, w1, w2, w3: fast_swiglu(x, w1, w2, w3, backend=config.kernels)  # noqa: E731
        super().__init__(config, SwiGLU(config.hidden_size, config.mlp_width, op), config.fast_post_norm)
        self.config, self.prefix = config, prefix
        self.keeps_chunk, self.keeps_keys = first, not first
        self.model_dtype = vllm_config.model_config.dtype
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    # ------------------------------------------------------------------ vLLM's state interface
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR  # its metadata: state indices, query starts, lengths

    def get_state_shape(self):
        return fast_state_shapes(self.config)

    def get_state_dtype(self):
        return fast_state_dtypes(self.model_dtype)

    @property
    def fast_states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w2, w3 of every state slot [slots, ...]."""
        return self.kv_cache[:3]

    # ------------------------------------------------------------------ the layer
    def apply(self, h: torch.Tensor, weights) -> torch.Tensor:
        """The sublayer's output for h [B, T, d] under per-request weights [B, ...]."""
        return self.post_norm(self.f(self.pre_norm(h), weights))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor,
                batch: RequestBatch | None) -> torch.Tensor:
        if batch is None:  # vLLM's warm-up and profiling runs: W_0, no state
            return super().forward(h)
        w1, w2, w3 = self.fast_states
        out = torch.empty_like(h)
        n = batch.num_decodes
        if n:  # one-token requests as one batch
            idx = torch.tensor(batch.slots[:n], device=h.device)
            out[:n] = self.apply(h[:n, None], (w1[idx], w2[idx], w3[idx]))[:, 0]
        for r in range(n, len(batch.slots)):
            i, j, s = batch.starts[r], batch.starts[r + 1], batch.slots[r]
            out[i:j] = self.apply(h[None, i:j], (w1[s, None], w2[s, None], w3[s, None]))[0]
        if self.keeps_chunk:
            _, _, _, pending_h, pending_ids, _, _ = self.kv_cache
            offsets = positions % self.config.mini_batch_size
            pending_h[batch.token_slots, offsets] = h
            pending_ids[batch.token_slots, offsets] = input_ids.to(pending_ids.dtype)
        return out

    def remember_keys(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, batch: RequestBatch | None):
        """Store the block attention's keys and values [tokens, kv] at their positions."""
        if batch is not None and self.keeps_keys:
            past_k, past_v = self.kv_cache[5:]
            ring = positions % past_k.shape[1]
            past_k[batch.token_slots, ring] = k
            past_v[batch.token_slots, ring] = v

    def past_keys(self, idx: torch.Tensor, chunk_start: torch.Tensor, window: int):
        """Keys, values [B, window, kv] of positions chunk_start - window .. chunk_start - 1 of the
        requests in state slots `idx`, and those positions [B, window] (negative: none)."""
        past_k, past_v = self.kv_cache[5:]
        pos = chunk_start[:, None] - window + torch.arange(window, device=idx.device)
        ring = pos % past_k.shape[1]
        return past_k[idx[:, None], ring].clone(), past_v[idx[:, None], ring].clone(), pos
