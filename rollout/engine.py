"""The interface every rollout engine implements, and the data it hands back.

An engine samples from the current policy and scores tokens under it, and takes new weights
from the learner. The torch engine (rollout/torch_engine.py) runs every Ponder model, TTT-E2E
fast weights included; other engines (vLLM) serve the architectures they support.

Log-probabilities of sampled tokens are taken under the SAMPLING distribution, softmax(logits /
temperature), before any top-p truncation. The learner computes log π_θ the same way, so the PPO
ratio π_θ / π_old compares like with like. Scores of true next tokens (`score`, the
`logp_next_*` fields) are at temperature 1: they are the model's own predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch


@dataclass
class Generation:
    """One sampled continuation of a prompt.

    ids: the generated tokens, the stop token included when one was hit.
    logprobs: log-prob of each generated token under the sampling distribution (logits /
        temperature, before top-p truncation), the same way the learner computes log π_θ.
    finish_reason: "stop" (a stop token was sampled) or "length" (max_new_tokens reached).
    """

    ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@dataclass
class ThoughtGroup:
    """The G thoughts sampled at one RLP position t, and the scores the rewards need.

    thoughts: G lists of ids after <think>, up to and including </think>; a thought that reached
        max_new_tokens gets </think> appended (forced), so every thought is closed.
    thought_logprobs: the sampling-distribution log-prob of every thought token (logits /
        temperature, before top-p); the forced </think> gets the model's log-prob of it.
    logp_next_with_thought: log p(x_t | x_<t, <think> c_i </think>) at temperature 1, per thought.
    logp_next_no_thought: log p(x_t | x_<t) at temperature 1 (under the same weights).
    truncated: per thought, whether its </think> was forced.
    """

    thoughts: list[list[int]]
    thought_logprobs: list[list[float]]
    logp_next_with_thought: list[float]
    logp_next_no_thought: float
    truncated: list[bool]


@runtime_checkable
class Engine(Protocol):
    """What a rollout worker needs from an engine. `version` is the policy version of the
    weights it holds (0 until the first `load_weights`); rollouts are tagged with it."""

    version: int

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop: Sequence[int] = ()) -> list[list[Generation]]:
        """n sampled continuations of every prompt (result[i] belongs to prompts[i])."""
        ...

    def score(self, sequences: list[list[int]], targets: list[int]) -> torch.Tensor:
        """Teacher-forced log p(targets[i] | sequences[i]) at temperature 1, shape [N]."""
        ...

    def think(self, contexts: list[list[int]], next_tokens: list[int], n: int, max_new_tokens: int,
              temperature: float, top_p: float, think_open: int, think_close: int) -> list[ThoughtGroup]:
        """For every context x_<t (with its true next token x_t): n thoughts and their scores."""
        ...

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the policy's weights (a full state dict) and set `version`."""
        ...
