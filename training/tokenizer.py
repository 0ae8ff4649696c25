"""Byte-level BPE tokenizer trained locally (no hub), with <think> and </think> as single tokens.

Encoding is plain: no BOS/EOS is inserted, the packer in training/data.py adds separators.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rollout.tokens import token_bytes

SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "think": "<think>",
    "end_think": "</think>",
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; every special token encodes as one id."""
    tok = Tokenizer(models.BPE())
    # Numbers split into digits (as Llama's and Qwen's tokenizers do): arithmetic is then learnable
    # digit by digit, with carries, instead of one token per number.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # All 256 bytes are in the vocabulary, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens=[SPECIAL_TOKENS["think"], SPECIAL_TOKENS["end_think"]],
        # Decoding must give back the exact text (no " ." -> "." clean-up) for bits per byte.
        clean_up_tokenization_spaces=False,
    )


def _is_saved(path: Path) -> bool:
    return (path / "tokenizer.json").is_file()


def load_or_train_tokenizer(
    path: str | Path, texts: Callable[[], Iterable[str]], vocab_size: int
) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved at `path`, or train one on texts() and save it there."""
    path = Path(path)
    if _is_saved(path):
        return PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer = train_tokenizer(texts(), vocab_size)
    # Save into a temporary directory beside `path` and rename it into place, so a crash or a
    # concurrent run never leaves a half-written tokenizer that a later run would load.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_saved(path):  # not a lost race with another writer: a real error
            raise
        return PreTrainedTokenizerFast.from_pretrained(path)
    return tokenizer


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> torch.LongTensor:
    """Number of UTF-8 bytes each id stands for (0 for special tokens), for bits per byte.

    Counted through the byte-level table rather than decode(): a token may hold part of a
    multi-byte character, which decodes to a replacement character on its own.
    """
    return torch.tensor([len(b) for b in token_bytes(tokenizer, list(range(len(tokenizer))))], dtype=torch.long)


def think_token_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """Ids of <think> and </think>."""
    ids = tokenizer.convert_tokens_to_ids([SPECIAL_TOKENS["think"], SPECIAL_TOKENS["end_think"]])
    return ids[0], ids[1]
