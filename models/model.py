"""Ponder's transformer, shaped like the TTT-E2E released configs: RMSNorm before and after every
sublayer (the post-norm is applied to the sublayer's output, before the residual add), QK-norm,
RoPE, SwiGLU MLPs, tied embeddings, attention full or sliding-window.

    model = PonderForCausalLM(PonderConfig(...))
    out = model(input_ids, targets=targets)     # out.logits [B, T, V], out.loss (mean CE)

`targets` are aligned with `input_ids` (targets[:, i] is the token after input_ids[:, i]), as
in nanoGPT; -100 marks positions without a target.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from kernels import sliding_window_attention
from models.config import PonderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [T, head_dim] for the rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: PonderConfig):
        super().__init__()
        d, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.window = config.attention_window
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        y = sliding_window_attention(q, k, v, self.window)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Sublayer(nn.Module):
    """x -> post_norm(f(pre_norm(x))): the residual branch of one sublayer."""

    def __init__(self, config: PonderConfig, f: nn.Module):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.pre_norm = RMSNorm(d, eps) if config.pre_norm else nn.Identity()
        self.f = f
        self.post_norm = RMSNorm(d, eps) if config.post_norm else nn.Identity()

    def forward(self, x, *args):
        return self.post_norm(self.f(self.pre_norm(x), *args))


class Block(nn.Module):
    def __init__(self, config: PonderConfig):
        super().__init__()
        self.attn = Sublayer(config, Attention(config))
        self.mlp = Sublayer(config, SwiGLU(config.hidden_size, config.intermediate_size))

    def forward(self, h, cos, sin):
        h = h + self.attn(h, cos, sin)
        return h + self.mlp(h)


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
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def lm_head(self, h):
        """Final norm and the tied output projection."""
        return F.linear(self.norm(h), self.embed.weight)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, **_) -> CausalLMOutput:
        T = input_ids.shape[1]
        h = self.embed(input_ids)
        cos, sin = rope_cos_sin(torch.arange(T, device=h.device), self.config.head_dim, self.config.rope_theta, h.dtype)
        for block in self.blocks:
            h = block(h, cos, sin)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward and backward): 6 per weight of every matmul, the tied
        output projection included, plus attention's scores and mixing over the keys each query
        sees on average."""
        c = self.config
        matmul_weights = self.num_params(exclude_embeddings=True) + c.vocab_size * c.hidden_size
        keys = seq_len if c.attention_window is None else min(c.attention_window, seq_len)
        mean_keys = (keys + 1) / 2 if keys == seq_len else keys  # causal triangle vs a full band
        return 6.0 * matmul_weights + 12.0 * c.num_hidden_layers * c.hidden_size * mean_keys

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
