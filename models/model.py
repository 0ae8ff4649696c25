"""Ponder's transformer, shaped like the TTT-E2E released configs: RMSNorm before and after every
sublayer (the post-norm is applied to the sublayer's output, before the residual add), QK-norm,
RoPE, SwiGLU MLPs, tied embeddings, attention full or sliding-window. The config also takes the
shapes of Llama / Qwen3 (models/convert.py): pre-norm only, grouped-query attention, an untied head,
QK-norm or none, scaled RoPE.

    model = PonderForCausalLM(PonderConfig(...))
    out = model(input_ids, targets=targets)     # out.logits [B, T, V], out.loss (mean CE; per chunk
                                                # with TTT-E2E, config.loss_average)

`targets` are aligned with `input_ids` (targets[:, i] is the token after input_ids[:, i]), as
in nanoGPT; -100 marks positions without a target.

With mode="ttt_e2e" the last `suffix_len` blocks carry a fast-weight MLP that trains on the
context as it is read (models/ttt.py), or one per level of continuum memory (models/memory.py,
config.cms_chunk_sizes). Decoding goes through a DecodeState:

    state = model.new_state(batch_size)
    logits = model(prompt, state=state).logits         # prefill
    logits = model(next_tokens, state=state).logits    # one step; state moves on in place
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from kernels import fast_swiglu, rms_norm, rope, sliding_window_attention, swiglu, twice_differentiable_attention
from kernels.attention import masked_attention
from kernels.rope import apply_rope  # noqa: F401  (re-exported: rollout/vllm_plugin imports it from here)
from models.config import PonderConfig
from models.memory import inner_update
from models.state import DecodeState, map_tensors
from models.static_state import RingKV
from models.ttt import chunk_mean_loss, initial_fast_weights, ttt_forward, upcast


class RMSNorm(nn.Module):
    """kernels.rms_norm with a learned gain; `backend` picks its kernels (PonderConfig.kernels)."""

    def __init__(self, dim: int, eps: float, backend: str = "torch"):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, backend=self.backend)



def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """RoPE's rotation frequencies (float64), scaled as Hugging Face's "linear" or "llama3" rope_type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":  # positions divided by the factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # long wavelengths divided by the factor, short ones kept, a smooth ramp between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [T, head_dim] for the rotate-half convention."""
    angles = positions.double()[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: PonderConfig, twice_differentiable: bool = False):
        super().__init__()
        # TTT-E2E's suffix needs gradients of gradients through attention, which fused attention
        # kernels do not provide: there it takes the materialised path, or Ponder's Triton kernel.
        self.attention = (partial(twice_differentiable_attention, backend=config.kernels) if twice_differentiable
                          else sliding_window_attention)
        d, self.head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.window = config.attention_window
        self.kernels = config.kernels  # the backend of RoPE
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.kernels) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.kernels) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns the output and the keys/values it attended to ([past; new], rotated keys, one
        per key/value head), so a caller can keep them as a cache."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (w(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2) for w in (self.wk, self.wv))
        q, k = rope(self.q_norm(q), cos, sin, self.kernels), rope(self.k_norm(k), cos, sin, self.kernels)
        group = self.n_heads // self.n_kv_heads  # query heads per key/value head, consecutive
        if isinstance(past, RingKV):  # one position into fixed buffers (models/static_state.py)
            k, v, visible = past.append(k, v)
            y = masked_attention(q, k.repeat_interleave(group, 1).to(q.dtype), v.repeat_interleave(group, 1).to(q.dtype),
                                 visible)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1)), past
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = self.attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), self.window)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, op=swiglu):
        super().__init__()
        self.op = op
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1.weight, self.w2.weight, self.w3.weight

    def forward(self, x, weights: tuple[torch.Tensor, ...] | None = None):
        """`weights` replaces the module's own (w1, w2, w3), e.g. by per-sequence fast weights."""
        return self.op(x, *(weights or self.weights()))


class Sublayer(nn.Module):
    """x -> post_norm(f(pre_norm(x), ...)): the residual branch of one sublayer."""

    def __init__(self, config: PonderConfig, f: nn.Module, post_norm: bool | None = None):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.pre_norm = RMSNorm(d, eps, config.kernels) if config.pre_norm else nn.Identity()
        self.f = f
        post_norm = config.post_norm if post_norm is None else post_norm
        self.post_norm = RMSNorm(d, eps, config.kernels) if post_norm else nn.Identity()

    def forward(self, x, *args, **kwargs):
        out = self.f(self.pre_norm(x), *args, **kwargs)
        if isinstance(out, tuple):  # attention also returns its keys/values
            return self.post_norm(out[0]), *out[1:]
        return self.post_norm(out)


class Block(nn.Module):
    """h += attn(h); [h += fast_mlp(h); h += memory_mlps[0](h); ...]; h += mlp(h). The fast MLP
    exists in TTT-E2E's suffix; continuum memory (models/memory.py) chains one more fast MLP per
    slower level after it."""

    def __init__(self, config: PonderConfig, fast: bool = False):
        super().__init__()
        self.attn = Sublayer(config, Attention(config, twice_differentiable=fast))
        fast_op = partial(fast_swiglu, backend=config.kernels)

        def fast_level(width):
            return Sublayer(config, SwiGLU(config.hidden_size, width, fast_op), config.fast_post_norm)

        widths = config.level_widths if fast else []
        self.fast_mlp = fast_level(widths[0]) if fast else None
        self.memory_mlps = nn.ModuleList(fast_level(w) for w in widths[1:]) if len(widths) > 1 else None
        self.mlp = Sublayer(config, SwiGLU(config.hidden_size, config.mlp_width))

    def fast_levels(self) -> list[Sublayer]:
        """The fast MLPs in the order they run, fastest level first."""
        return [self.fast_mlp, *(self.memory_mlps or [])] if self.fast_mlp is not None else []

    def fast_weights(self) -> list[torch.Tensor]:
        """W_0 of every level, flat: w1, w2, w3 of the first level, then of the next, ..."""
        return [w for level in self.fast_levels() for w in level.f.weights()]

    def forward(self, h, cos, sin, past=None, fast_weights=None):
        a, kv = self.attn(h, cos, sin, past)
        h = h + a
        for i, level in enumerate(self.fast_levels()):
            h = h + level(h, fast_weights[3 * i : 3 * i + 3] if fast_weights is not None else None)
        return h + self.mlp(h), kv


class PonderPreTrainedModel(PreTrainedModel):
    config_class = PonderConfig
    base_model_prefix = "ponder"
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class PonderForCausalLM(PonderPreTrainedModel):
    def __init__(self, config: PonderConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        n_prefix = config.num_hidden_layers - (config.suffix_len if config.is_ttt else 0)
        self.blocks = nn.ModuleList(Block(config, fast=i >= n_prefix) for i in range(config.num_hidden_layers))
        self.n_prefix = n_prefix
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        # The output projection: the embedding itself when tied, else a matrix of its own.
        self.head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The inner learning rate in use; the trainer warms it up, inference uses the config's.
        self.inner_lr = config.ttt_inner_lr
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head  # None when tied: resizing the embedding resizes the projection

    def set_output_embeddings(self, value):
        self.head = value

    @property
    def output_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the output projection's matrix (the embedding when tied)."""
        return self.embed.weight if self.head is None else self.head.weight

    def lm_head(self, h):
        """Final norm and the output projection."""
        return F.linear(self.norm(h), self.output_weight)

    def rope(self, start: int | torch.Tensor, length: int, like: torch.Tensor):
        """cos, sin of positions start .. start + length - 1; `start` may be a device tensor (a
        CUDA graph reads the position it is at)."""
        positions = start + torch.arange(length, device=like.device)
        return rope_cos_sin(positions, self.inv_freq(like.device), like.dtype)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE's frequencies in float64 on `device`, made once per device (a buffer would follow
        the model's dtype)."""
        cache = self.__dict__.setdefault("_inv_freq", {})
        if device not in cache:
            c = self.config
            cache[device] = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_params).to(device)
        return cache[device]

    def run_blocks(self, blocks, h, start: int, state: DecodeState | None, first_layer: int = 0, fast=None):
        """Run `blocks` over h (positions start..), reading and extending `state`'s caches."""
        cos, sin = self.rope(start, h.shape[1], h)
        for i, block in enumerate(blocks):
            layer = first_layer + i
            past = state.kv[layer] if state is not None else None
            h, kv = block(h, cos, sin, past, fast[i] if fast is not None else None)
            if state is not None:
                state.kv[layer] = kv
        return h

    def new_state(self, batch_size: int, differentiable: bool = False) -> DecodeState:
        """An empty per-sequence decoding state: caches, and W_0 as every sequence's fast weights.
        differentiable: for training through the state, W_0 still attached to its parameters."""
        fast = initial_fast_weights(self, batch_size) if self.config.is_ttt else None
        if fast is not None and not differentiable:  # detached, every sequence its own storage (not a view of W_0)
            fast = map_tensors(lambda w: w.detach().clone(), fast)
        return DecodeState(kv=[None] * self.config.num_hidden_layers, fast=fast, differentiable=differentiable)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                state: DecodeState | None = None, **_) -> CausalLMOutput:
        start = state.pos if state is not None else 0
        if self.config.is_ttt:
            logits = ttt_forward(self, input_ids, targets, state, update=inner_update(self.config))
        else:
            logits = self.lm_head(self.run_blocks(self.blocks, self.embed(input_ids), start, state))
            if state is not None:
                state.advance(input_ids, self.config.attention_window)
        loss = None if targets is None else self.outer_loss(logits, targets, start)
        return CausalLMOutput(loss=loss, logits=logits)

    def outer_loss(self, logits: torch.Tensor, targets: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The training loss of logits at positions start.. (config.loss_average: per chunk or per token)."""
        if self.config.loss_average == "chunk":
            return chunk_mean_loss(logits, targets, self.config.mini_batch_size, start)
        return F.cross_entropy(upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward and backward): 6 per weight of every matmul, the tied
        output projection included, plus attention's scores and mixing over the keys each query
        sees on average. TTT-E2E adds the inner loop: a backward through the suffix and head for
        every chunk (4 per weight), and with second order the outer backward through it (8 more)."""
        c = self.config
        head = c.vocab_size * c.hidden_size
        # parameters() hold an untied head already; a tied one only as the embedding
        matmul_weights = self.num_params(exclude_embeddings=True) + (head if self.head is None else 0)
        keys = seq_len if c.attention_window is None else min(c.attention_window, seq_len)
        mean_keys = (keys + 1) / 2 if keys == seq_len else keys  # causal triangle vs a full band
        flops = 6.0 * matmul_weights + 12.0 * c.num_hidden_layers * c.hidden_size * mean_keys
        if c.is_ttt:
            suffix = sum(p.numel() for b in self.blocks[self.n_prefix:] for p in b.parameters()) + head
            flops += (12.0 if c.ttt_grad == "second_order" else 4.0) * suffix
        return flops

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
