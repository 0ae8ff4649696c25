"""Ponder's transformer as a vLLM model: models/model.py's blocks with vLLM's paged attention.

Module and parameter names are those of models.PonderForCausalLM, so a Ponder state dict loads
name for name. Norms and MLPs are Ponder's own modules (plain torch: vLLM's CPU linear layers are
repacked into custom ops without autograd, and TTT-E2E's inner step differentiates through the
suffix); only attention is vLLM's, which keeps the keys and values in its paged cache. Queries and
keys are rotated by Ponder's own RoPE functions, so positions mean the same in both.

TTT-E2E's fast MLP is rollout/vllm_plugin/ttt.py's FastMLP, whose per-request state vLLM keeps
beside the paged cache. At the start of every forward the TTT-E2E model gives new requests W_0
and takes the inner step of every request whose chunk has just completed (`start_step`); the
blocks then run with weights that stay fixed within the forward.
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
from models.ttt import inner_sgd_step, per_sequence_loss
from rollout.vllm_plugin import SCHEDULER, unservable_reason
from rollout.vllm_plugin.ttt import N_STATES, FastMLP, RequestBatch, fast_state_dtypes, fast_state_shapes


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

    def rotated(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries, keys [..., heads, head_dim] (normed, rotated) and values of x [..., d] at `positions` [...]."""
        shape = x.shape[:-1]
        q = self.q_norm(self.wq(x).view(*shape, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(*shape, self.n_kv_heads, self.head_dim))
        cos, sin = rope_cos_sin(positions.flatten(), self.inv_freq, x.dtype)
        cos, sin = cos.view(*shape, 1, -1), sin.view(*shape, 1, -1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.wv(x).view(*shape, self.n_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        """The output, and the keys and values [N, kv] it cached."""
        N = x.shape[0]
        q, k, v = self.rotated(x, positions)
        k, v = k.reshape(N, -1), v.reshape(N, -1)
        return self.wo(self.paged(q.reshape(N, -1), k, v)), k, v

    def attend_chunk(self, x: torch.Tensor, positions: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                     past_positions: torch.Tensor) -> torch.Tensor:
        """The output for chunks x [B, T, d] at `positions` [B, T], attending to themselves and to
        fixed keys/values [B, W, kv] at `past_positions` [B, W] (negative: none), with plain
        torch ops (differentiable: TTT-E2E's inner step goes through them)."""
        B, T, _ = x.shape
        q, k, v = self.rotated(x, positions)
        k = torch.cat([past_k.view(B, -1, self.n_kv_heads, self.head_dim), k], 1)
        v = torch.cat([past_v.view(B, -1, self.n_kv_heads, self.head_dim), v], 1)
        keys, queries = torch.cat([past_positions, positions], 1)[:, None], positions[:, :, None]
        seen = (keys >= 0) & (keys <= queries) & (keys > queries - self.window)
        group = self.n_heads // self.n_kv_heads
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1),
                                           v.transpose(1, 2).repeat_interleave(group, 1), attn_mask=seen[:, None],
                                           scale=self.head_dim ** -0.5)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """models.model.Block on flat tokens: h += attn(h); [h += fast_mlp(h)]; h += mlp(h)."""

    def __init__(self, config: PonderConfig, vllm_config: VllmConfig, prefix: str, fast: bool, first_fast: bool):
        super().__init__()
        self.attn = Sublayer(config, PagedAttention(config, vllm_config, f"{prefix}.attn"))
        self.fast_mlp = FastMLP(config, vllm_config, f"{prefix}.fast_mlp", first_fast) if fast else None
        self.mlp = Sublayer(config, SwiGLU(config.hidden_size, config.mlp_width))

    def forward(self, h, positions, input_ids, batch: RequestBatch | None):
        a, k, v = self.attn(h, positions)
        h = h + a
        if self.fast_mlp is not None:
            self.fast_mlp.remember_keys(k, v, positions, batch)
            h = h + self.fast_mlp(h, positions, input_ids, batch)
        return h + self.mlp(h)

    def recompute(self, h: torch.Tensor, positions: torch.Tensor, fast: list[torch.Tensor], slots: torch.Tensor,
                  attend: bool) -> torch.Tensor:
        """A suffix block over chunks h [B, b, d] of the requests in state `slots`, with fast
        weights `fast`, differentiably. attend=False: h is already past the block's attention
        (the first suffix block's stored inputs); else attention also sees the stored window."""
        if attend:
            attn = self.attn.f
            past = self.fast_mlp.past_keys(slots, positions[:, 0], attn.window)
            h = h + self.attn.post_norm(attn.attend_chunk(self.attn.pre_norm(h), positions, *past))
        h = h + self.fast_mlp.apply(h, fast)
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
        self.blocks = nn.ModuleList(Block(config, vllm_config, f"{prefix}blocks.{i}", fast=i >= n_prefix,
                                          first_fast=i == n_prefix) for i in range(config.num_hidden_layers))
        self.suffix = self.blocks[n_prefix:]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Applies the logit scale only (the worker extension sets it for a sampling temperature).
        self.logits_processor = LogitsProcessor(config.vocab_size, logits_as_input=True)

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
        batch = self.start_step(input_ids, positions)
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for block in self.blocks:
            h = block(h, positions, input_ids, batch)
        return h

    def start_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> RequestBatch | None:
        """What a forward does before its blocks run (nothing without fast weights)."""
        return None

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
    MLPs with per-request state (fast weights, the pending chunk, a window of keys) in vLLM's
    Mamba-style cache. With ttt_update_during_decode=false a request learns only from chunks
    whose targets all lie in its context; `context_ends` (set by the worker extension's
    ponder_follow_context_ends) says where each request's context ends."""

    context_ends = None

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

    def start_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> RequestBatch | None:
        """New requests start from W_0; a request whose step starts at a chunk boundary p > 0
        first learns from the chunk before it. Returns the batch (None in vLLM's warm-up runs)."""
        batch = RequestBatch.of(self.suffix[0].fast_mlp.prefix, positions)
        if batch is None:
            return None
        b = self.config.mini_batch_size
        for pos, length in zip(batch.first_pos, batch.lengths()):
            if pos % b + length > b:
                raise RuntimeError(f"a step of {length} tokens from position {pos} crosses a TTT-E2E chunk boundary "
                                   f"(every {b} tokens): serve this model with scheduler_cls={SCHEDULER!r}, as "
                                   "rollout/vllm_engine.py does")
        device = input_ids.device
        fresh = torch.tensor([s for s, p in zip(batch.slots, batch.first_pos) if p == 0], device=device)
        if len(fresh):
            for block in self.suffix:
                for state, w0 in zip(block.fast_mlp.fast_states, block.fast_mlp.f.weights()):
                    state[fresh] = w0
        due = [r for r, p in enumerate(batch.first_pos) if p and p % b == 0]
        if due and not self.config.ttt_update_during_decode:  # learn only from chunks whose targets are all context
            ends = self.request_context_ends(len(batch.slots))
            due = [r for r in due if batch.first_pos[r] < ends[r]]
        if due:
            self.learn(torch.tensor([batch.slots[r] for r in due], device=device),
                       input_ids[[batch.starts[r] for r in due]],
                       torch.tensor([batch.first_pos[r] - b for r in due], device=device))
        return batch

    def request_context_ends(self, num_requests: int) -> list[int]:
        """Where each request's context ends, in batch order (the worker extension's
        ponder_follow_context_ends provides them)."""
        if self.context_ends is None:
            raise RuntimeError("a TTT-E2E model with ttt_update_during_decode=false needs each request's context "
                               "end: serve it through rollout.vllm_engine.VLLMEngine, or call "
                               "collective_rpc('ponder_follow_context_ends') once after vLLM starts")
        return self.context_ends(num_requests)

    def learn(self, slots: torch.Tensor, next_ids: torch.Tensor, chunk_starts: torch.Tensor) -> None:
        """One inner step of the requests in state `slots` on their complete pending chunks
        (starting at `chunk_starts`; the last target is the request's entry of `next_ids`): the
        fast weights of every suffix block are replaced in place."""
        cfg = self.config
        first = self.suffix[0].fast_mlp
        _, _, _, pending_h, pending_ids, _, _ = first.kv_cache
        with torch.inference_mode(False), torch.enable_grad():
            targets = torch.cat([pending_ids[slots, 1:], next_ids.view(-1, 1).to(pending_ids.dtype)], 1).long()
            positions = chunk_starts[:, None] + torch.arange(cfg.mini_batch_size, device=slots.device)
            fast = [[w[slots].clone().requires_grad_() for w in block.fast_mlp.fast_states] for block in self.suffix]
            h = pending_h[slots].clone()
            for k, (block, weights) in enumerate(zip(self.suffix, fast)):
                h = block.recompute(h, positions, weights, slots, attend=k > 0)
            loss = per_sequence_loss(self.lm_head(h), targets)
            new = inner_sgd_step(fast, loss, cfg.ttt_inner_lr, cfg.ttt_clip, create_graph=False, retain_graph=False,
                                 kernels=cfg.kernels)
        for block, weights in zip(self.suffix, new):
            for state, w in zip(block.fast_mlp.fast_states, weights):
                state[slots] = w.detach()
