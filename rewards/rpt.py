"""RPT rewards (arXiv 2506.08007): next-token prediction as a task with a verifiable answer.

A response is a thought followed by a prediction in \\boxed{...}. The prefix-match reward is 1 when
the predicted bytes equal the bytes of the first k true tokens for some k >= 1: several tokens may
be predicted at once, but the prediction must end where a true token ends. Matching is byte-exact:
no stripping, so a token with a leading space (" 4") must be predicted with that space.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .base import RewardInput, register

# Only box openings and braces matter to the scan; everything between them is skipped.
_BRACES = re.compile(r"\\boxed\{|[{}]")


def extract_prediction(text: str) -> str | None:
    """The content of the last \\boxed{...} to close, nested braces included; None if there is
    none. A box inside a box closes first, so the outer one wins; an unclosed box (a truncated
    response) is not a prediction."""
    opened: list[int] = []  # per open brace: where a box's content starts, or -1 for a plain brace
    last = None
    for m in _BRACES.finditer(text):
        if m.group() == "}":
            if opened and (start := opened.pop()) >= 0:
                last = text[start : m.start()]
        else:
            opened.append(m.end() if m.group() != "{" else -1)
    return last


def _to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    try:  # surrogateescape restores the raw bytes of a token that cuts a multi-byte character
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no byte maps to: it cannot match anything real
        return text.encode("utf-8", "replace")


def prefix_match(prediction: str, target_token_texts: Sequence[str | bytes]) -> bool:
    """True iff the prediction's bytes equal the first k target tokens' bytes, for some k >= 1.

    Tokens may be given as raw bytes or as text decoded with errors="surrogateescape".
    """
    want = _to_bytes(prediction)
    if not want:
        return False
    got = b""
    for token in target_token_texts:
        got += _to_bytes(token)
        if len(got) >= len(want):
            return got == want
        if not want.startswith(got):
            return False
    return False


@register("rpt_prefix_match")
def rpt_prefix_match(inp: RewardInput) -> list[float]:
    """1.0 if the thought's boxed prediction prefix-matches the true continuation, else 0.0."""
    preds = [extract_prediction(t) for t in inp.thought_texts]
    return [float(p is not None and prefix_match(p, inp.target_token_texts)) for p in preds]


@register("rpt_first_token")
def rpt_first_token(inp: RewardInput) -> list[float]:
    """1.0 iff the boxed prediction is exactly the first true token (x_t), else 0.0."""
    first = _to_bytes(inp.target_token_texts[0])
    preds = [extract_prediction(t) for t in inp.thought_texts]
    return [float(p is not None and bool(first) and _to_bytes(p) == first) for p in preds]


def _completion_text(completion: str | list[dict[str, Any]]) -> str:
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content") or ""
    if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def rpt_prefix_match_trl(
    prompts: list[Any],
    completions: list[str] | list[list[dict[str, Any]]],
    target_token_texts: list[Sequence[str | bytes]],
    **kwargs: Any,
) -> list[float]:
    """`rpt_prefix_match` as a TRL `reward_funcs` callable.

    GRPOTrainer calls it with prompts=, completions=, completion_ids=, every other dataset column
    (here `target_token_texts`, one list of token texts per example) and trainer_state=,
    log_extra=, log_metric= (environments= too when set); all but the first three are ignored.
    A completion is a string, or for conversational data a list of messages whose last holds
    the response.
    """
    rewards = []
    for completion, targets in zip(completions, target_token_texts, strict=True):
        pred = extract_prediction(_completion_text(completion))
        rewards.append(float(pred is not None and prefix_match(pred, targets)))
    return rewards
