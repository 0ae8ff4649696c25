"""RLP rewards (arXiv 2510.01265): the information gain of a thought about the next token.

r_i = log p_θ(x_t | x_<t, c_i) − log p_baseline(x_t | x_<t), teacher-forced and without gradient.
Its expectation over x_t is the drop in cross-entropy the thought buys, so it is positive exactly
when thinking made the model a better predictor of the real next token.
"""

from __future__ import annotations

from .base import RewardInput, register


def _need(value, field: str, reward: str):
    if value is None:
        raise ValueError(f"{reward} needs {field}, which the worker did not compute")
    return value


@register("rlp_info_gain", needs={"logp_with_thought", "logp_no_thought_ema"})
def rlp_info_gain(inp: RewardInput) -> list[float]:
    """Information gain against the EMA teacher's no-think prediction (the paper's reward)."""
    with_thought = _need(inp.logp_with_thought, "logp_with_thought", "rlp_info_gain")
    baseline = _need(inp.logp_no_thought_ema, "logp_no_thought_ema", "rlp_info_gain")
    return [lp - baseline for lp in with_thought]


@register("rlp_info_gain_policy_baseline", needs={"logp_with_thought", "logp_no_thought_policy"})
def rlp_info_gain_policy_baseline(inp: RewardInput) -> list[float]:
    """Information gain against the policy's own no-think prediction.

    For runs that keep no EMA teacher (it costs a full copy of the weights). The baseline moves
    with the policy, so the reward measures only what the thought adds at this step; expect
    smaller rewards than against the lagged EMA teacher (methods.md §1).
    """
    with_thought = _need(inp.logp_with_thought, "logp_with_thought", "rlp_info_gain_policy_baseline")
    baseline = _need(inp.logp_no_thought_policy, "logp_no_thought_policy", "rlp_info_gain_policy_baseline")
    return [lp - baseline for lp in with_thought]
