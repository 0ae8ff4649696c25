"""Ponder's transformer as a vLLM model: models/model.py's blocks with vLLM's paged attention.

Module and parameter names are those of models.PonderForCausalLM, so a Ponder state dict loads
name for name. Norms and MLPs are Ponder's own modules (plain torch: vLLM's CPU linear layers are
repacked into custom ops without autograd, and TTT-E2E's inner step differentiates through the
suffix); only attention is vLLM's, which keeps the keys and values in its paged cache. Queries and
keys are rotated by Ponder's own RoPE functions, so positions mean the same in both.

TTT-E2E's fast MLP is rollout/vllm_plugin/ttt.py's FastMLP, whose per-request state vLLM keeps
beside the paged cache.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention as VLLMAttention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

from models.config import PonderConfig
from models.model import Attention, RMSNorm, Sublayer, SwiGLU, apply_rope, rope_cos_sin, rope_inv_freq
from rollout.vllm_plugin import unservable_reason
from rollout.vllm_plugin.ttt import N_STATES, FastMLP, fast_state_dtypes, fast_state_shapes


class PagedAttention(Attention):
    """models.model.Attention's projections, QK-norm and RoPE around vLLM's paged attention.
    Works on flat tokens [N, d] of every request in the batch, at their `positions`."""

    def __init__(self, config: PonderConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__(config)
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_params)
        # vLLM reads a model-wide window from config.sliding_window, which a Ponder config carries in
        # every mode: the layer gets the window of its mode instead (None: full attention).
        cache_config = copy.copy(vllm_config.cache_config)
        cache_config.sliding_window = self.window
        self.paged = VLLMAttention(self.n_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.n_kv_heads,
                                   cache_config=cache_config, per_layer_sliding_window=self.window,
                                   prefix=f"{prefix}.paged")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        q = self.q_norm(self.wq(x).view(N, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(N, self.n_kv_heads, self.head_dim))
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        y = self.paged(q.reshape(N, -1), k.reshape(N, -1), self.wv(x))
        return self.wo(y)


class Block(nn.Module):
    """models.model.Block on flat tokens: h += attn(h); [h += fast_mlp(h)]; h += mlp(h)."""

    def __init__(self, config: PonderConfig, vllm_config: VllmConfig, prefix: str, fast: bool):
        super().__init__()
        self.attn = Sublayer(config, PagedAttention(config, vllm_config, f"{prefix}.attn"))
        self.fast_mlp = FastMLP(config, vllm_config, f"{prefix}.fast_mlp") if fast else None
        self.mlp = Sublayer(config, SwiGLU(config.hidden_size, config.mlp_width))

    def forward(self, h, positions, input_ids):
        h = h + self.attn(h, positions)
        if self.fast_mlp is not None:
            h = h + self.fast_mlp(h, positions, input_ids)
        return h + self.mlp(h)


class PonderVLLMForCausalLM(nn.Module):
    """Ponder's full-attention and sliding-window models (and the base of the TTT-E2E one)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: PonderConfig = vllm_config.model_config.hf_config
        reason = unservable_reason(config, cuda=torch.cuda.is_available())
        if reason:
            raise ValueError(f"vLLM cannot serve this Ponder model: {reason}")
        if config.is_ttt and not isinstance(self, IsHybrid):
            raise ValueError("a TTT-E2E Ponder model is served under the architecture PonderTTTForCausalLM: pass "
                             "hf_overrides={'architectures': ['PonderTTTForCausalLM']} (rollout/vllm_engine.py does)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        n_prefix = config.num_hidden_layers - (config.suffix_len if config.is_ttt else 0)
        self.blocks = nn.ModuleList(Block(config, vllm_config, f"{prefix}blocks.{i}", fast=i >= n_prefix)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Applies the logit scale only (the worker extension sets it for a sampling temperature).
        self.logits_processor = LogitsProcessor(config.vocab_size, logits_as_input=True)
        for block in self.blocks[n_prefix:]:
            # The inner loss is taken at the network's end: the rest of the block, final norm, head.
            block.fast_mlp.loss_tail = self._tail_of(block)

    def _tail_of(self, block: Block):
        def tail(h):  # h: the suffix block's hidden state after its fast MLP
            return self.lm_head(h + block.mlp(h))
        return tail

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self.output_weight)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **_) -> torch.Tensor:
        if input_ids is None and self.config.is_ttt:
            raise ValueError("a TTT-E2E model needs token ids (its fast weights learn to predict them), not embeddings")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for block in self.blocks:
            h = block(h, positions, input_ids)
        return h

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(None, self.lm_head(hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """A Ponder state dict, name for name, at start and on every reload. Each weight becomes a
        fresh parameter made outside inference mode (vLLM loads inside it): TTT-E2E's inner step
        differentiates through them, which inference tensors cannot take part in."""
        params = dict(self.named_parameters())
        loaded = set()
        with torch.inference_mode(False), torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    if name == "head.weight" and self.head is None:  # a tied checkpoint may carry the copy
                        continue
                    raise KeyError(f"{name} is not a weight of this Ponder model (mode {self.config.mode!r})")
                old = params[name]
                if tensor.shape != old.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the model's is {tuple(old.shape)}")
                module_name, _, attr = name.rpartition(".")
                new = tensor.to(device=old.device, dtype=old.dtype).clone()
                self.get_submodule(module_name)._parameters[attr] = nn.Parameter(new, requires_grad=False)
                loaded.add(name)
        return loaded


class PonderTTTVLLMForCausalLM(PonderVLLMForCausalLM, HasInnerState, IsHybrid):
    """Ponder's TTT-E2E model: attention layers with paged keys/values, and the suffix's fast
    MLPs with per-request state (fast weights, the pending chunk) in vLLM's Mamba-style cache."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return fast_state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return fast_state_dtypes(vllm_config.model_config.dtype)

    @classmethod
    def get_mamba_state_copy_func(cls):
        # Every state is restored whole from the block where prefix caching stored it.
        return (get_temporal_copy_spec,) * N_STATES
