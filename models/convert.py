"""A pretrained Hugging Face transformer (Llama, Qwen3) as a TTT-E2E Ponder model (methods.md §7).

    model = convert_hf("path/to/llama", suffix_len=2, sliding_window=8192, mini_batch_size=1024)

Every source weight is kept. Attention switches to the sliding window; the last `suffix_len`
blocks gain a fast MLP (MLP′) between attention and the static MLP, so that the converted model
computes exactly the source's function on any sequence that fits in the window, with the inner
loop running:

    h += attn(input_norm(h));  h += out_norm(MLP′(norm′(h)));  h += mlp(post_attention_norm(h))

MLP′ starts as a copy of its block's own MLP (features already matched to the residual stream)
behind an output RMSNorm whose gain is zero. Why the gain and not MLP′'s down projection w2:
- with w2 = 0 the inner gradient of w2 is not zero, so the first inner step already moves the
  fast weights and every later chunk differs from the source;
- with the gain at 0 the fast MLP's output, and so every inner gradient, is exactly zero: the
  fast weights stay at W_0 and the function is the source's however many chunks are read. The
  outer (meta) gradient of the gain is not zero, so the bridge's first optimiser step opens it,
  and from then on W_0 and the inner loop learn (Adam's step does not shrink with the small gain).
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.config import ROPE_TYPES, PonderConfig
from models.model import PonderForCausalLM

SUPPORTED = ("LlamaForCausalLM", "Qwen3ForCausalLM")


class ConversionError(ValueError):
    """The source cannot be converted; the message names what and what would be right."""


def source_config(source_dir: str | Path):
    """The source's transformers config, checked for everything the conversion needs."""
    from transformers import AutoConfig

    source_dir = Path(source_dir)
    if not (source_dir / "config.json").is_file():
        raise ConversionError(f"{source_dir} holds no config.json: give a directory written by save_pretrained")
    hf = AutoConfig.from_pretrained(source_dir)
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
    if arch not in SUPPORTED:
        raise ConversionError(f"{source_dir}: architecture {arch} is not supported; supported: {', '.join(SUPPORTED)}")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    unsupported = {
        f"rope type {rope_type!r} (implemented: {', '.join(ROPE_TYPES)})": rope_type not in ROPE_TYPES,
        f"hidden_act={hf.hidden_act!r} (only silu)": hf.hidden_act != "silu",
        "attention biases (attention_bias=true)": getattr(hf, "attention_bias", False),
        "MLP biases (mlp_bias=true)": getattr(hf, "mlp_bias", False),
    }
    problems = [what for what, bad in unsupported.items() if bad]
    if problems:
        raise ConversionError(f"{source_dir} ({arch}) uses {'; '.join(problems)}, which the conversion does not implement")
    return hf


def ponder_config(hf, suffix_len: int | None, sliding_window: int, mini_batch_size: int) -> PonderConfig:
    rope = dict(hf.rope_parameters or {})
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
    return PonderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, ttt_intermediate_size=hf.intermediate_size,  # widths kept
        mode="ttt_e2e", sliding_window=sliding_window, suffix_len=suffix_len, mini_batch_size=mini_batch_size,
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling_params=rope if rope.get("rope_type", "default") != "default" else None,
        rms_norm_eps=hf.rms_norm_eps, qk_norm=hf.model_type == "qwen3", pre_norm=True, post_norm=False,
        fast_post_norm=True, max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=hf.tie_word_embeddings, bos_token_id=hf.bos_token_id, eos_token_id=eos,
        pad_token_id=hf.pad_token_id,
    )


def weight_names(config: PonderConfig, with_fast: bool) -> list[tuple[str, str]]:
    """(Ponder's parameter name, the source's) for every weight a source provides (Llama and Qwen3
    share their names). with_fast: also MLP′ of the suffix blocks, each a copy of its block's MLP."""
    names = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not config.tie_word_embeddings:
        names.append(("head.weight", "lm_head.weight"))
    n_prefix = config.num_hidden_layers - config.suffix_len
    attn = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    if config.qk_norm:
        attn.update(q_norm="q_norm", k_norm="k_norm")
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        names += [(f"{dst}attn.f.{ours}.weight", f"{src}self_attn.{theirs}.weight") for ours, theirs in attn.items()]
        names.append((f"{dst}attn.pre_norm.weight", f"{src}input_layernorm.weight"))
        for mlp in ["mlp"] + (["fast_mlp"] if with_fast and i >= n_prefix else []):
            names.append((f"{dst}{mlp}.pre_norm.weight", f"{src}post_attention_layernorm.weight"))
            names += [(f"{dst}{mlp}.f.{ours}.weight", f"{src}mlp.{theirs}.weight")
                      for ours, theirs in {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.items()]
    return names


def ponder_state_dict(source: dict[str, torch.Tensor], config: PonderConfig) -> dict[str, torch.Tensor]:
    """The converted model's weights: the source's, and MLP′'s zero output gains."""
    out = {ours: source[theirs] for ours, theirs in weight_names(config, with_fast=True)}
    for i in range(config.num_hidden_layers - config.suffix_len, config.num_hidden_layers):
        out[f"blocks.{i}.fast_mlp.post_norm.weight"] = torch.zeros(config.hidden_size)  # MLP′ off until the bridge
    return out


def to_llama(model: PonderForCausalLM):
    """A Llama-shaped Ponder model (full attention, pre-norm only, no QK-norm) as a LlamaForCausalLM,
    e.g. a plain transformer pretrained here, to convert and bridge like any other checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.mode != "full" or c.post_norm or c.qk_norm:
        raise ConversionError(f"to_llama needs mode=full, post_norm=false, qk_norm=false (got mode={c.mode}, "
                              f"post_norm={c.post_norm}, qk_norm={c.qk_norm})")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling_params or {})}
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_width,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=rope,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, architectures=["LlamaForCausalLM"]))
    ours = model.state_dict()
    theirs = {hf: ours[name] for name, hf in weight_names(c, with_fast=False)}
    if c.tie_word_embeddings:
        theirs["lm_head.weight"] = ours["embed.weight"]
    llama.load_state_dict(theirs, strict=True)
    return llama


def convert_hf(source_dir: str | Path, suffix_len: int | None = None, sliding_window: int = 8192,
               mini_batch_size: int = 1024, dtype: torch.dtype = torch.float32) -> PonderForCausalLM:
    """The source model (LlamaForCausalLM or Qwen3ForCausalLM, save_pretrained) as a TTT-E2E Ponder model."""
    from transformers import AutoModelForCausalLM

    hf = source_config(source_dir)  # fails here, before any weight is read
    config = ponder_config(hf, suffix_len, sliding_window, mini_batch_size)
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=dtype)
    model = PonderForCausalLM(config).to(dtype)
    model.load_state_dict(ponder_state_dict(source.state_dict(), config), strict=True)
    return model
