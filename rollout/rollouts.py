"""What a rollout worker returns and the learner trains on: thought samples, grouped per step."""

from __future__ import annotations

from dataclasses import dataclass, field

TARGET_TOKENS = 8  # tokens of the true continuation a reward sees (RPT matches multi-token prefixes)


@dataclass
class ThoughtSample:
    """One thought at one position: what the learner's policy-gradient term trains on."""

    context: list[int]  # x_<t
    thought: list[int]  # the ids after <think>, ending with </think>
    old_logprobs: list[float]  # log π_old of every thought token (sampling temperature)
    advantage: float
    reward: float


@dataclass
class Rollouts:
    version: int  # the policy version that sampled them
    samples: list[ThoughtSample]
    rewards: list[float]  # every kept reward
    dropped: int = 0  # thoughts whose reward raised, was NaN or None
    first_drop: str = ""  # why the first of them was dropped (the exception, or the value)
    positions: int = 0
    thought_tokens: int = 0
    context_tokens: int = 0  # tokens prefilled by the policy (FLOPs accounting)
    closed: int = 0  # thoughts the policy closed itself (the others had </think> forced at the limit)
    examples: list[dict] = field(default_factory=list)  # a few thoughts as text, for the report
    timings: dict[str, float] = field(default_factory=dict)
