"""What a reward sees, the reward registry, and the group-level plumbing around rewards.

A reward is a pure function of one `RewardInput` (one position of one document, G thoughts) that
returns one float per thought, or None to drop that thought. It declares which log-probabilities
it needs, so a rollout worker scores only those. Rewards import no models or engines: they are
plain Python and test in microseconds.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# The scores a worker can be asked to compute; a reward's `needs` is a subset of these.
LOGP_FIELDS = ("logp_with_thought", "logp_no_thought_ema", "logp_no_thought_policy")


@dataclass(frozen=True)
class RewardInput:
    """Everything a rollout worker has for one position t of one document, with G thoughts.

    Token texts are compared as UTF-8 bytes. A byte-level tokenizer can cut a multi-byte
    character between two tokens; decode each token with errors="surrogateescape" (or pass its
    raw bytes) so its exact bytes survive. A token decoded to U+FFFD cannot match.
    """

    context_ids: list[int]  # x_<t
    target_ids: list[int]  # the true continuation from x_t on; target_ids[0] is x_t
    target_token_texts: list[str]  # decoded text of each token of target_ids
    thought_ids: list[list[int]]  # the G thoughts
    thought_texts: list[str]  # the G thoughts, decoded
    logp_with_thought: list[float] | None = None  # log p_θ(x_t | x_<t, c_i), one per thought
    logp_no_thought_ema: float | None = None  # log p_φ(x_t | x_<t), EMA teacher
    logp_no_thought_policy: float | None = None  # log p_θ(x_t | x_<t), policy

    def __post_init__(self) -> None:
        # A mismatch here is a worker bug, not a reward fault: fail loudly where it happens.
        if not self.target_ids:
            raise ValueError("target_ids must hold at least one token (x_t)")
        if len(self.target_token_texts) != len(self.target_ids):
            raise ValueError(
                f"target_token_texts has {len(self.target_token_texts)} entries for {len(self.target_ids)} target_ids"
            )
        if len(self.thought_texts) != len(self.thought_ids):
            raise ValueError(
                f"thought_texts has {len(self.thought_texts)} entries for {len(self.thought_ids)} thoughts"
            )
        if self.logp_with_thought is not None and len(self.logp_with_thought) != len(self.thought_ids):
            raise ValueError(
                f"logp_with_thought has {len(self.logp_with_thought)} entries for {len(self.thought_ids)} thoughts"
            )

    @property
    def group_size(self) -> int:
        return len(self.thought_ids)


RewardFn = Callable[[RewardInput], Sequence[float | None]]


@dataclass(frozen=True)
class Reward:
    """A named reward function and the log-probabilities it needs the worker to compute."""

    name: str
    fn: RewardFn
    needs: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, inp: RewardInput) -> Sequence[float | None]:
        return self.fn(inp)


_REGISTRY: dict[str, Reward] = {}


def _check_needs(needs: Iterable[str] | str, owner: str) -> frozenset[str]:
    if isinstance(needs, str):  # needs="logp_with_thought" would otherwise become a set of letters
        needs = (needs,)
    needs = frozenset(needs)
    unknown = sorted(needs - set(LOGP_FIELDS))
    if unknown:
        raise ValueError(f"reward {owner!r} needs unknown field(s) {unknown}; allowed: {list(LOGP_FIELDS)}")
    return needs


def register(name: str, needs: Iterable[str] = ()) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`. The function is returned unchanged, with a
    `needs` attribute, so it also loads by dotted path."""
    checked = _check_needs(needs, name)

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered ({_REGISTRY[name].fn!r})")
        _REGISTRY[name] = Reward(name=name, fn=fn, needs=checked)
        fn.needs = checked  # type: ignore[attr-defined]
        return fn

    return decorator


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(spec: str) -> Reward:
    """A registered reward by name, or a user's function by "package.module:function"."""
    if ":" not in spec:
        if spec in _REGISTRY:
            return _REGISTRY[spec]
        raise ValueError(
            f"unknown reward {spec!r}; registered rewards: {registered_rewards()}; "
            f"or give your own function as 'pkg.module:function'"
        )
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward {spec!r} is not of the form 'pkg.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if isinstance(obj, Reward):
        return obj
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr_path!r} is not callable")
    return Reward(name=spec, fn=obj, needs=_check_needs(getattr(obj, "needs", ()), spec))


_reported: set[tuple[str, str]] = set()  # (reward name, kind of fault) already logged


def _report_once(reward: Reward, kind: str, msg: str, exc_info: bool = False) -> None:
    if (reward.name, kind) not in _reported:
        _reported.add((reward.name, kind))
        logger.warning("%s (reported once per reward)", msg, exc_info=exc_info)


def score_group(reward: Reward, inp: RewardInput, why: list[str] | None = None) -> tuple[list[float | None], int]:
    """Score one group without ever raising on the reward's fault: (rewards, n_dropped).

    A reward that raises or returns the wrong number of values drops the whole group; a value
    that is None, not a number, NaN or ±inf drops that one thought. `why`, when given, gets
    one line per drop cause (the exception, or the bad value).
    """
    g = inp.group_size
    why = [] if why is None else why
    try:
        out = reward(inp)
        if isinstance(out, (str, bytes)):  # iterable, but never a list of rewards
            raise TypeError(f"returned {type(out).__name__}, not a sequence of floats")
        values = list(out)
    except Exception as e:
        _report_once(reward, "raised", f"reward {reward.name!r} raised; dropping its groups", exc_info=True)
        why.append(f"{type(e).__name__}: {e}")
        return [None] * g, g
    if len(values) != g:
        _report_once(reward, "length", f"reward {reward.name!r} returned {len(values)} values for {g} thoughts")
        why.append(f"returned {len(values)} values for {g} thoughts")
        return [None] * g, g
    rewards: list[float | None] = []
    for v in values:
        try:
            r = float(v) if v is not None else None
        except (TypeError, ValueError):
            r = None
        rewards.append(r if r is not None and math.isfinite(r) else None)
        if rewards[-1] is None:
            why.append(f"returned {v!r}, not a finite number")
    return rewards, sum(r is None for r in rewards)


def group_advantages(rewards: Sequence[float | None]) -> list[float | None]:
    """RLP's advantage over the kept thoughts of a group: A_i = G'/(G'−1) · (r_i − mean r).

    G' counts the kept (non-None) rewards; the mean is over those. This equals the leave-one-out
    baseline r_i − mean_{j≠i} r_j, so A_i does not depend on r_i through its own baseline. No std
    normalisation. Dropped thoughts stay None; with G' < 2 there is no baseline and all are None.
    """
    kept = [r for r in rewards if r is not None]
    n = len(kept)
    if n < 2:
        return [None] * len(rewards)
    mean = sum(kept) / n
    scale = n / (n - 1)
    return [None if r is None else scale * (r - mean) for r in rewards]
