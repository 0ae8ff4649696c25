"""What the learner needs from any causal LM, a Ponder model or a Hugging Face one (Llama,
Qwen3, ...) loaded with `from_pretrained`: the next-token loss with aligned targets, a FLOPs
estimate, and which of the two it is.

Targets are ALIGNED: targets[:, i] is the token that follows input_ids[:, i] (-100: no loss),
as Ponder's `model(ids, targets=...)` takes them; Hugging Face's `labels=` shifts instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_ponder(model) -> bool:
    """Whether `model` is Ponder's own backbone (model_type "ponder": full, SWA or TTT-E2E)."""
    return getattr(model.config, "model_type", None) == "ponder"


def is_ttt(model) -> bool:
    """Whether `model` runs TTT-E2E's inner loop (a Ponder model in mode ttt_e2e)."""
    return is_ponder(model) and model.config.is_ttt


def next_token_loss(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `targets` (aligned with `input_ids`, -100 ignored), in float32.
    A TTT-E2E model needs the targets inside its forward (its inner loop trains on them)."""
    if is_ponder(model):
        return model(input_ids, targets=targets).loss
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward). Ponder models count their own (inner loop
    included); any other causal LM: 6 per weight of every matmul (embedding lookups excluded,
    the output projection included even when tied) plus attention's scores and mixing,
    12·layers·(query heads·head dim)·mean keys over a causal window of `seq_len` tokens."""
    if is_ponder(model):
        return model.flops_per_token(seq_len)
    c = model.config.get_text_config()
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    # parameters() lists a tied matrix once: drop the lookup, add the projection back.
    matmul_weights = sum(p.numel() for p in model.parameters()) - (0 if tied else embed.numel())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    mean_keys = (seq_len + 1) / 2
    return 6.0 * matmul_weights + 12.0 * c.num_hidden_layers * c.num_attention_heads * head_dim * mean_keys


THINK_TOKENS = ("<think>", "</think>")


@torch.no_grad()
def add_think_tokens(model, tokenizer) -> list[int]:
    """Give a causal LM and its tokenizer RLP's <think> and </think> where the tokenizer lacks them:
    special tokens (never split), and for each a row of the embedding (and of an untied output
    projection) set to the mean of the rows of the tokens that existed before. Every old token keeps
    its embedding and its output row, so its logits on any old-token input are unchanged. Returns
    the ids of the tokens added ([] if none were missing)."""
    missing = [t for t in THINK_TOKENS if t not in tokenizer.get_vocab()]
    if not missing:
        return []
    old = len(tokenizer)
    tokenizer.add_tokens(missing, special_tokens=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # else the embedding has spare rows already (a vocabulary padded up)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(missing)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    for w in matrices:
        w[ids] = w[:old].mean(0)
    return ids
