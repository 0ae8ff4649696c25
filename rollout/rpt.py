"""RPT's rollouts (methods.md §2): positions a proxy model finds uncertain, and responses that end
in a boxed prediction of what comes next.

For every window the proxy reads it once; a position t is a candidate when the entropy of the
proxy's next-token distribution over its top-k tokens (renormalised over them) is above the
threshold. At each chosen position the policy reads x_<t followed by <think> and writes G
responses, "thought </think> \\boxed{prediction}" up to the eos token; the reward (prefix match by
default) grades each one against the true continuation. Everything after <think> is the response
the policy gradient trains on, exactly as RLP trains a thought (training/losses.py).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rollout.rollouts import TARGET_TOKENS, Rollouts
from rollout.worker import RolloutWorker


def top_k_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) cut to its k most likely entries and renormalised, over the
    last dimension."""
    top = logits.float().topk(min(k, logits.shape[-1]), dim=-1).values
    logp = F.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def proxy_entropy(proxy, windows: torch.Tensor, k: int, batch_size: int = 16) -> torch.Tensor:
    """windows [N, T+1] -> [N, T+1]: entry t is the proxy's top-k entropy for x_t given x_<t
    (entry 0, with no context, is 0: never a candidate)."""
    device = next(proxy.parameters()).device
    rows = []
    for i in range(0, len(windows), batch_size):
        logits = proxy(windows[i : i + batch_size, :-1].to(device)).logits
        rows.append(top_k_entropy(logits, k).cpu())
    entropy = torch.cat(rows)
    return torch.cat([torch.zeros(len(windows), 1), entropy], 1)


def candidate_positions(entropy: torch.Tensor, threshold: float, min_context: int) -> list[int]:
    """Positions t >= min_context of one window (entropy [T+1]) whose entropy is above threshold."""
    keep = entropy > threshold
    keep[:min_context] = False
    return keep.nonzero().flatten().tolist()


def pick(candidates: list[int], k: int, generator: torch.Generator) -> list[int]:
    """Up to k of the candidates, uniformly without replacement, in order."""
    order = torch.randperm(len(candidates), generator=generator)[:k]
    return sorted(candidates[i] for i in order.tolist())


def choose_contexts(proxy, windows: torch.Tensor, rpt_cfg, rlp_cfg, generator: torch.Generator
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """RPT's positions in windows [N, T+1]: up to rlp.positions_per_window per window among those
    the proxy finds uncertain. Returns the contexts x_<t and the true continuations from x_t on (TARGET_TOKENS of them)."""
    entropy = proxy_entropy(proxy, windows, rpt_cfg.entropy_top_k)
    contexts, targets = [], []
    for window, row in zip(windows.tolist(), entropy):
        for t in pick(candidate_positions(row, rpt_cfg.entropy_threshold, rlp_cfg.min_context),
                      rlp_cfg.positions_per_window, generator):
            contexts.append(window[:t])
            targets.append(window[t : t + TARGET_TOKENS])
    return contexts, targets


class RPTWorker(RolloutWorker):
    """A RolloutWorker whose positions come from the proxy's entropy and whose thoughts are RPT
    responses. Weights, generators and restarts work as for RLP (rollout/pool.py)."""

    def __init__(self, model_dir: str, tokenizer_dir: str, rlp_cfg, reward: str, seed: int,
                 device: str | None = "cpu", engine: str = "torch", *, rpt_cfg):
        from transformers import AutoModelForCausalLM

        super().__init__(model_dir, tokenizer_dir, rlp_cfg, reward, seed, device, engine)
        self.rpt = rpt_cfg
        self.proxy = AutoModelForCausalLM.from_pretrained(rpt_cfg.proxy or model_dir).to(self.teacher.device).eval()
        self.eos = self.tokenizer.eos_token_id

    def rollout(self, windows: torch.Tensor) -> Rollouts:
        """windows: [N, T+1]; one group of G responses per chosen position (positions_per_window at
        most; a window without a candidate gives none)."""
        cfg, rpt = self.cfg, self.rpt
        out = Rollouts(version=self.version, samples=[], rewards=[])
        start = time.perf_counter()
        contexts, targets = choose_contexts(self.proxy, windows, rpt, cfg, self.generator)
        prompts = [c + [self.think_open] for c in contexts]
        groups = self.policy.generate(prompts, cfg.group_size, rpt.response_max_tokens, cfg.temperature, cfg.top_p,
                                      stop=[self.eos]) if prompts else []
        out.timings["timing_s/rollout"] = time.perf_counter() - start

        start = time.perf_counter()
        for context, target, group in zip(contexts, targets, groups):
            self.add_group(out, context, target, [g.ids for g in group], [g.logprobs for g in group],
                           [g.finish_reason == "length" for g in group])
        out.timings["timing_s/reward"] = time.perf_counter() - start
        return out
