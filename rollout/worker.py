"""The RolloutWorker: a Ray actor that turns context windows into rewarded thought groups.

For every window it chooses positions t; the policy engine reads x_<t once (with TTT-E2E, the
fast weights train on it), samples G thoughts from that shared state and scores
log p_θ(x_t | x_<t, c_i); the EMA teacher scores log p_φ(x_t | x_<t) when the reward needs it;
the configured reward turns those into one float per thought. The batch it returns is tagged
with the policy version that produced it.
"""

from __future__ import annotations

import math
import time
import torch

from rewards import RewardInput, get_reward, group_advantages, score_group
from rollout.rollouts import TARGET_TOKENS, Rollouts, ThoughtSample
from rollout.tokens import token_texts
from rollout.sync import WeightBroadcast, from_wire, ray_device
from rollout.torch_engine import TorchEngine

EXAMPLES_PER_ROLLOUT = 2  # thought groups a worker returns as text each step


def choose_positions(seq_len: int, k: int, min_context: int, generator: torch.Generator,
                     weights: torch.Tensor | None = None) -> list[int]:
    """k distinct positions t in [min_context, seq_len] (x_t is the token to predict): uniform, or
    drawn without replacement with probability proportional to `weights` [seq_len + 1] (e.g. the
    teacher's next-token entropy at each t)."""
    candidates = seq_len - min_context + 1
    if weights is None:
        picks = torch.randperm(candidates, generator=generator)[: min(k, candidates)]
    else:
        w = weights[min_context : seq_len + 1].double().clamp(min=1e-12)
        picks = torch.multinomial(w, min(k, candidates), replacement=False, generator=generator)
    return sorted((picks + min_context).tolist())


class RolloutWorker:
    """Holds the policy, the EMA teacher and the reward. The policy runs on the torch engine or,
    with engine="vllm", on vLLM (what rollout/vllm_engine.py serves); the teacher, which only scores
    contexts, always runs on the torch engine."""

    def __init__(self, model_dir: str, tokenizer_dir: str, rlp_cfg, reward: str, seed: int, device: str | None = "cpu",
                 engine: str = "torch"):
        import models  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        torch.set_num_threads(1)  # decoding is many tiny ops: threads only add synchronisation
        device = device or str(ray_device())  # None: the GPU Ray assigned this actor, else the CPU
        self.cfg = rlp_cfg
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        self.think_open, self.think_close = self.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
        if engine == "vllm":
            from rollout.vllm_engine import VLLMEngine

            self.policy = VLLMEngine(model_dir, seed=seed)  # refuses what vLLM cannot serve, naming the reason
        elif engine == "torch":
            self.policy = TorchEngine(AutoModelForCausalLM.from_pretrained(model_dir), device, seed=seed)
        else:
            raise ValueError(f"rollout.engine={engine!r}: must be 'torch' or 'vllm'")
        self.teacher = TorchEngine(AutoModelForCausalLM.from_pretrained(model_dir), device, seed=seed + 1)
        self.reward = get_reward(reward)
        self.generator = torch.Generator().manual_seed(seed)
        self.weights_loaded = False  # by this life of the actor: a restarted one starts from the base's
        self.seen = False  # whether the pool has met this life of the actor (restore_weights)
        self.sync = None  # the weight broadcast this life joined (sync.method=collective)

    @property
    def version(self) -> int:
        return self.policy.version

    def load_weights(self, policy_state: dict, ema_state: dict, version: int) -> int:
        """State dicts of tensors, or as the object store carries them (rollout/sync.py: to_wire)."""
        self.policy.load_weights(from_wire(policy_state), version)
        self.teacher.load_weights(from_wire(ema_state), version)
        self.weights_loaded = True
        return version

    def restore_weights(self, weights: list | None) -> tuple[bool, bool]:
        """The pool's first call to every life of the actor (Ray restarts it from its constructor,
        with the base's weights, busy or idle). A life that has loaded no weights loads `weights`
        (references to the policy, EMA and version last sent; empty when they travel by broadcast).
        Returns (whether this life is new to the pool, whether it holds weights the learner sent)."""
        if weights and not self.weights_loaded:
            import ray

            self.load_weights(*ray.get(weights))
        new, self.seen = not self.seen, True
        return new, self.weights_loaded

    def join_sync(self, addr: str, port: int, rank: int, world: int, bucket_mb: float, timeout_s: float) -> None:
        """Join the learner's weight broadcast (sync.method=collective) as member `rank`."""
        self.sync = WeightBroadcast(addr, port, rank, world, self.teacher.device, bucket_mb, timeout_s)

    def receive_weights(self) -> int:
        """The policy and EMA weights learner rank 0 broadcasts; returns their version. The teacher
        (always the torch engine, same architecture) gives the layout for both."""
        if self.sync is None:  # a new life of the actor, not yet in the re-formed group
            raise RuntimeError("this rollout worker has not joined the weight broadcast since it was restarted")
        template = self.teacher.model.state_dict()
        (policy, ema), version = self.sync.receive([template, template])
        return self.load_weights(policy, ema, version)

    def weights(self, teacher: bool = False) -> dict[str, torch.Tensor]:
        """The policy's (or the EMA teacher's) weights, on the CPU (torch engine; vLLM keeps them in
        its own fused layout)."""
        engine = self.teacher if teacher else self.policy
        if not isinstance(engine, TorchEngine):
            raise NotImplementedError("weights() reads the torch engine's model only")
        return {k: v.detach().to("cpu", copy=True) for k, v in engine.model.state_dict().items()}

    def versions(self) -> tuple[int, int]:
        return self.policy.version, self.teacher.version

    def rng_state(self) -> dict:
        """The generators a rollout draws from (positions, sampling), for an exact resume."""
        state = {"positions": self.generator.get_state()}
        for name, engine in (("policy", self.policy), ("teacher", self.teacher)):  # either engine
            state[name] = engine.generator.get_state()
        return state

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["positions"])
        for name, engine in (("policy", self.policy), ("teacher", self.teacher)):
            if name in state:
                engine.generator.set_state(state[name])

    def rollout(self, windows: torch.Tensor) -> Rollouts:
        """windows: [N, T+1] token windows; one group of G thoughts per chosen position."""
        cfg, out = self.cfg, Rollouts(version=self.version, samples=[], rewards=[])
        start = time.perf_counter()
        contexts, nexts, targets = [], [], []
        seq_len, k = windows.shape[1] - 1, cfg.positions_per_window
        if cfg.position_sampling == "entropy":  # H of the teacher's next-token distribution at every t
            entropy = torch.cat([torch.zeros(len(windows), 1), self.teacher.next_token_entropy(windows[:, :-1])], 1)
            positions = [choose_positions(seq_len, k, cfg.min_context, self.generator, e) for e in entropy]
        else:  # one uniform draw for the whole batch: contexts of one length are thought about together
            positions = [choose_positions(seq_len, k, cfg.min_context, self.generator)] * len(windows)
        for window, chosen in zip(windows.tolist(), positions):
            for t in chosen:
                contexts.append(window[:t])
                nexts.append(window[t])
                targets.append(window[t : t + TARGET_TOKENS])
        groups = self.policy.think(contexts, nexts, cfg.group_size, cfg.thought_max_tokens, cfg.temperature,
                                   cfg.top_p, self.think_open, self.think_close)
        ema = None
        if "logp_no_thought_ema" in self.reward.needs:
            ema = self.teacher.score(contexts, nexts).tolist()
        out.timings["timing_s/rollout"] = time.perf_counter() - start

        start = time.perf_counter()
        for i, (context, group) in enumerate(zip(contexts, groups)):
            self.add_group(out, context, targets[i], group.thoughts, group.thought_logprobs, group.truncated,
                           logp_with_thought=group.logp_next_with_thought,
                           logp_no_thought_ema=None if ema is None else ema[i],
                           logp_no_thought_policy=group.logp_next_no_thought)
        out.timings["timing_s/reward"] = time.perf_counter() - start
        return out

    def add_group(self, out: Rollouts, context: list[int], target: list[int], thoughts: list[list[int]],
                  thought_logprobs: list[list[float]], truncated: list[bool], **logps) -> None:
        """Reward one group of thoughts at one position and add what the learner trains on to `out`:
        every thought whose reward and advantage are finite, with the counts and an example."""
        inp = RewardInput(context_ids=context, target_ids=target, target_token_texts=token_texts(self.tokenizer, target),
                          thought_ids=thoughts, thought_texts=self.tokenizer.batch_decode(thoughts), **logps)
        why: list[str] = []
        rewards, dropped = score_group(self.reward, inp, why)
        out.dropped += dropped
        out.first_drop = out.first_drop or (why[0] if why else "")
        for thought, logprobs, r, a in zip(thoughts, thought_logprobs, rewards, group_advantages(rewards)):
            if a is None or not math.isfinite(a):
                continue
            out.samples.append(ThoughtSample(context, thought, logprobs, a, r))
            out.rewards.append(r)
        if len(out.examples) < EXAMPLES_PER_ROLLOUT:
            out.examples.append(self.example(context, target[0], thoughts, rewards, truncated))
        out.positions += 1
        out.closed += sum(not t for t in truncated)
        out.thought_tokens += sum(len(th) for th in thoughts)
        out.context_tokens += len(context)

    def example(self, context: list[int], next_token: int, thoughts: list[list[int]], rewards: list,
                truncated: list[bool]) -> dict:
        """One thought group as text: the end of its context, the true next token, every thought
        with its reward and whether the policy closed it."""
        return {"context": self.tokenizer.decode(context[-48:]), "next_token": self.tokenizer.decode([next_token]),
                "thoughts": [{"text": self.tokenizer.decode(t), "reward": r, "closed": not tr}
                             for t, r, tr in zip(thoughts, rewards, truncated)]}
