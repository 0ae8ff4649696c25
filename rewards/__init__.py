"""The reward registry and Ponder's rewards: RLP information gain, RPT prefix match, variants.

    reward = get_reward("rlp_info_gain")           # or "my_pkg.my_module:my_reward"
    rewards, n_dropped = score_group(reward, inp)  # inp: RewardInput, one position, G thoughts
    advantages = group_advantages(rewards)
"""

from .base import (
    LOGP_FIELDS,
    Reward,
    RewardInput,
    get_reward,
    group_advantages,
    register,
    registered_rewards,
    score_group,
)
from .rlp import rlp_info_gain, rlp_info_gain_policy_baseline
from .rpt import (
    extract_prediction,
    prefix_match,
    rpt_first_token,
    rpt_prefix_match,
    rpt_prefix_match_trl,
)

__all__ = [
    "LOGP_FIELDS",
    "Reward",
    "RewardInput",
    "get_reward",
    "group_advantages",
    "register",
    "registered_rewards",
    "score_group",
    "rlp_info_gain",
    "rlp_info_gain_policy_baseline",
    "extract_prediction",
    "prefix_match",
    "rpt_first_token",
    "rpt_prefix_match",
    "rpt_prefix_match_trl",
]
