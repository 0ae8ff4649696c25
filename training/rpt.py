"""RPT's evaluation (methods.md §2): next-token accuracy on held-out positions, bucketed by the
proxy's entropy there.

The positions are drawn once, from held-out windows, among those whose proxy entropy is above the
lowest bucket's threshold; every evaluation asks the policy for one greedy response per position
(thought, </think>, \\boxed{prediction}) and grades it with the run's reward. A bucket holds every
position above its threshold, so "hard" is a subset of "medium", which is a subset of "easy".
"""

from __future__ import annotations

import torch

from rewards import RewardInput, get_reward
from rollout.rpt import candidate_positions, pick, proxy_entropy
from rollout.tokens import token_texts
from rollout.rollouts import TARGET_TOKENS

BUCKETS = {"easy": 0.5, "medium": 1.0, "hard": 1.5}  # proxy entropy (nats) a position is above


class RPTAccuracy:
    """eval/rpt_acc_{easy,medium,hard}: the share of held-out positions of each bucket whose greedy
    response the reward grades 1, and eval/rpt_n_{...}: how many positions each bucket holds."""

    def __init__(self, tokenizer, proxy, windows: torch.Tensor, positions: int, min_context: int, top_k: int = 16,
                 max_new_tokens: int = 48, reward: str = "rpt_prefix_match", seed: int = 0):
        self.tokenizer, self.max_new_tokens, self.reward = tokenizer, max_new_tokens, get_reward(reward)
        self.think_open = tokenizer.convert_tokens_to_ids("<think>")
        entropy = proxy_entropy(proxy, windows, top_k)
        lowest = min(BUCKETS.values())
        found = [(w, t) for w, row in enumerate(entropy) for t in candidate_positions(row, lowest, min_context)]
        chosen = pick(found, positions, torch.Generator().manual_seed(seed))  # (window, t) pairs, in order
        rows = windows.tolist()
        self.contexts = [rows[w][:t] for w, t in chosen]
        self.targets = [rows[w][t : t + TARGET_TOKENS] for w, t in chosen]
        self.entropy = [entropy[w, t].item() for w, t in chosen]

    def __len__(self) -> int:
        return len(self.contexts)

    def __call__(self, model) -> dict[str, float]:
        from rollout.torch_engine import TorchEngine

        was_training = model.training
        model.eval()
        engine = TorchEngine(model, device=next(model.parameters()).device)
        prompts = [c + [self.think_open] for c in self.contexts]
        outputs = engine.generate(prompts, 1, self.max_new_tokens, 0.0, stop=[self.tokenizer.eos_token_id])
        model.train(was_training)
        correct = [graded(self.tokenizer, self.reward, c, t, out[0].ids)
                   for c, t, out in zip(self.contexts, self.targets, outputs)]
        return bucket_accuracy(correct, self.entropy)


def graded(tokenizer, reward, context: list[int], target: list[int], response: list[int]) -> bool:
    """Whether `reward` grades the response (token ids after <think>) 1 against the true tokens."""
    inp = RewardInput(context_ids=context, target_ids=target, target_token_texts=token_texts(tokenizer, target),
                      thought_ids=[response], thought_texts=[tokenizer.decode(response)])
    value = reward(inp)[0]
    return value is not None and value >= 1.0


def bucket_accuracy(correct: list[bool], entropy: list[float]) -> dict[str, float]:
    metrics = {}
    for name, threshold in BUCKETS.items():
        graded = [c for c, h in zip(correct, entropy) if h > threshold]
        metrics[f"eval/rpt_acc_{name}"] = sum(graded) / len(graded) if graded else float("nan")
        metrics[f"eval/rpt_n_{name}"] = len(graded)
    return metrics
