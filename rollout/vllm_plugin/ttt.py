"""TTT-E2E's fast MLP inside vLLM: every request keeps its own fast weights, updated as
models/ttt.py defines them, in vLLM's per-request state cache (the one its Mamba layers use).

Per request the state holds w1, w2, w3 and the chunk read since the last inner update: the
hidden states entering the fast MLP (h after the block's attention) and their token ids. Chunks
are aligned to absolute positions 0, b, 2b, ... (b = mini_batch_size). When the token at a
position p = k·b (k ≥ 1) arrives, the chunk [p−b, p) has all its targets (the last one is that
token), so before computing p the fast weights take one clipped SGD step on the chunk's mean
next-token loss, taken at the network's end: that is models/ttt.py's update, which step-by-step
decoding and one forward over the whole sequence both make. Prefill and decode follow the same
rule, so vLLM may cut prefills anywhere (chunked prefill) and fuse decode steps of many requests.

With a single suffix block (suffix_len 1) the loss depends on the fast weights only through
that block's fast MLP, static MLP, final norm and head, all per token: the chunk's stored hidden
states are all the update needs. Deeper suffixes would also recompute the later blocks'
attention over the chunk; the vLLM engine refuses them (rollout/vllm_engine.py).

vLLM runs the forward in inference mode; the inner gradient runs in a normal-mode island on
clones of the state (inference tensors cannot be saved for backward), with plain torch ops.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from kernels import fast_swiglu
from models.config import PonderConfig
from models.model import Sublayer, SwiGLU
from models.ttt import inner_sgd_step, per_sequence_loss

N_STATES = 5  # w1, w2, w3, the pending chunk's hidden states, its token ids


def fast_state_shapes(config: PonderConfig) -> tuple[tuple[int, ...], ...]:
    """Shapes of one request's state of one fast MLP (no leading request dimension)."""
    d, width, b = config.hidden_size, config.mlp_width, config.mini_batch_size
    return (width, d), (d, width), (width, d), (b, d), (b,)


def fast_state_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    return dtype, dtype, dtype, dtype, torch.int32


class FastMLP(Sublayer, MambaBase):
    """The suffix block's fast MLP sublayer, x -> post_norm(SwiGLU(pre_norm(x); W)), with W the
    request's own fast weights. Its parameters are W_0 (models.model's fast_mlp, name for name).
    `loss_tail` (set by the model) maps the block's hidden state after this sublayer to logits."""

    def __init__(self, config: PonderConfig, vllm_config: VllmConfig, prefix: str):
        op = lambda x, w1, w2, w3: fast_swiglu(x, w1, w2, w3, backend=config.kernels)  # noqa: E731
        super().__init__(config, SwiGLU(config.hidden_size, config.mlp_width, op), config.fast_post_norm)
        self.config, self.prefix, self.chunk = config, prefix, config.mini_batch_size
        self.model_dtype = vllm_config.model_config.dtype
        self.loss_tail = None
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

    # ------------------------------------------------------------------ the layer
    def apply(self, h: torch.Tensor, weights) -> torch.Tensor:
        """The sublayer's output for h [B, T, d] under per-request weights [B, ...]."""
        return self.post_norm(self.f(self.pre_norm(h), weights))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        meta = get_forward_context().attn_metadata
        meta = meta.get(self.prefix) if isinstance(meta, dict) else None
        if meta is None:  # vLLM's warm-up and profiling runs: W_0, no state
            return super().forward(h)
        w1, w2, w3, pending_h, pending_ids = self.kv_cache
        num_reqs = meta.num_prefills + meta.num_decodes
        starts = meta.query_start_loc[: num_reqs + 1].tolist()
        slots = meta.state_indices_tensor[:num_reqs].tolist()
        first_pos = positions[starts[:-1]].tolist()
        out = torch.zeros_like(h)
        for slot, pos in zip(slots, first_pos):
            if pos == 0:  # a new sequence (or one recomputed from its start): W_0
                for state, w0 in zip((w1, w2, w3), self.f.weights()):
                    state[slot].copy_(w0)

        # vLLM puts the one-token requests (decodes) first: they go as one batch.
        n = meta.num_decodes
        if starts[n] != n:
            raise RuntimeError(f"expected the {n} one-token requests first in the batch; query starts {starts}")
        if n:
            due = [r for r, pos in enumerate(first_pos[:n]) if pos and pos % self.chunk == 0]
            if due:  # requests whose chunk completes now learn together, as one batch
                self._learn([slots[r] for r in due], input_ids[[starts[r] for r in due]])
            idx = torch.tensor(slots[:n], device=h.device)
            out[:n] = self.apply(h[:n, None], (w1[idx], w2[idx], w3[idx]))[:, 0]
            offsets = torch.tensor(first_pos[:n], device=h.device) % self.chunk
            pending_h[idx, offsets] = h[:n]
            pending_ids[idx, offsets] = input_ids[:n].to(pending_ids.dtype)

        # Prefills, cut at chunk boundaries: round k takes every request's k-th piece, so the
        # requests whose chunk completes before that piece learn together, as one batch.
        pieces = []  # per request: (first token, end, position of the first token)
        for r in range(n, num_reqs):
            i, end, pos, cut = starts[r], starts[r + 1], first_pos[r], []
            while i < end:
                j = min(end, i + self.chunk - pos % self.chunk)
                cut.append((i, j, pos))
                i, pos = j, pos + j - i
            pieces.append((slots[r], cut))
        for k in range(max((len(cut) for _, cut in pieces), default=0)):
            now = [(slot, cut[k]) for slot, cut in pieces if k < len(cut)]
            due = [(slot, i) for slot, (i, _, pos) in now if pos and pos % self.chunk == 0]
            if due:
                self._learn([slot for slot, _ in due], input_ids[[i for _, i in due]])
            for slot, (i, j, pos) in now:
                offset = pos % self.chunk
                out[i:j] = self.apply(h[None, i:j], (w1[slot, None], w2[slot, None], w3[slot, None]))[0]
                pending_h[slot, offset : offset + j - i] = h[i:j]
                pending_ids[slot, offset : offset + j - i] = input_ids[i:j].to(pending_ids.dtype)
        return out

    def _learn(self, slots: list[int], next_ids: torch.Tensor) -> None:
        """One inner step of each request in `slots` on its complete pending chunk, whose last
        target is the request's entry of `next_ids`; their fast weights are replaced in place."""
        w1, w2, w3, pending_h, pending_ids = self.kv_cache
        idx = torch.tensor(slots, device=pending_h.device)
        with torch.inference_mode(False), torch.enable_grad():
            targets = torch.cat([pending_ids[idx, 1:], next_ids.view(-1, 1).to(pending_ids.dtype)], 1).long()
            h = pending_h[idx].clone()
            fast = [[w[idx].clone().requires_grad_() for w in (w1, w2, w3)]]
            hidden = h + self.apply(h, fast[0])
            loss = per_sequence_loss(self.loss_tail(hidden), targets)
            (new,) = inner_sgd_step(fast, loss, self.config.ttt_inner_lr, self.config.ttt_clip, create_graph=False,
                                    retain_graph=False, kernels=self.config.kernels)
        for state, w in zip((w1, w2, w3), new):
            state[idx] = w.detach()
