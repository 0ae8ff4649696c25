"""The RLP Learner (a Ray actor in pipelines/rlp_midtrain.py).

One step is one graph and one backward:

    loss = w_rlp · L_RLP(thought tokens, advantages)  +  λ · L_NTP(windows)

L_RLP is computed on [x_<t ; <think> ; c_i], so with TTT-E2E the thought's log-probabilities
come from fast weights already adapted on x_<t, and its gradient reaches the slow weights (and
W_0) through the inner loop; L_NTP is the next-token (meta-learning) loss over the windows. After
the optimiser step the EMA teacher moves (φ ← τφ + (1-τ)θ) and the policy version rises by one.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from models.hf import flops_per_token, is_ttt, next_token_loss
from rollout.worker import Rollouts
from training.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, save_model, set_rng_state
from training.data import split_window
from training.evaluate import heldout_bpb
from training.losses import rlp_policy_loss, thought_batch
from training.trainer import build_optimizer, warmup_cosine


class Learner:
    def __init__(self, cfg, model_dir: str, run_dir: str, heldout_windows: torch.Tensor, token_bytes: torch.Tensor,
                 think_open: int, pad_id: int, device: str = "cpu", task_eval=None,
                 initial_counters: dict[str, float] | None = None):
        """initial_counters: tokens/data and flops/total spent before this run (its base model's
        pretraining), so the curves of a run that pretrained its own base start where it ended."""
        import models  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModelForCausalLM

        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)  # φ ← θ at the first step
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.heldout_windows = heldout_windows[: cfg.train.eval_windows]
        self.token_bytes, self.think_open, self.pad_id = token_bytes, think_open, pad_id
        self.is_ttt = is_ttt(self.model)  # a Ponder TTT-E2E model; Hugging Face causal LMs train too
        eos = self.model.config.eos_token_id  # the corpus's separator (a list in some HF configs)
        self.boundary_id = (eos[0] if isinstance(eos, list) else eos) if cfg.data.mask_boundary_targets else None
        self.version = 0  # optimiser steps taken = the policy version
        self.counters = {"tokens/data": 0, "tokens/thought": 0, "flops/total": 0.0, "rollouts/dropped_stale": 0,
                         "rollouts/dropped_reward": 0, "train/skipped_steps": 0, **(initial_counters or {})}
        self.task_eval = task_eval

    def train_step(self, rollouts: list[Rollouts], windows: torch.Tensor) -> dict[str, float]:
        cfg, rlp = self.cfg, self.cfg.rlp
        start = time.perf_counter()
        # Off-policy beyond max_staleness versions: dropped, and counted.
        fresh = [r for r in rollouts if self.version - r.version <= rlp.max_staleness]
        self.counters["rollouts/dropped_stale"] += sum(len(r.samples) for r in rollouts if r not in fresh)
        self.counters["rollouts/dropped_reward"] += sum(r.dropped for r in rollouts)
        samples = [s for r in fresh for s in r.samples]

        lr = warmup_cosine(self.version, lr=cfg.optim.lr, end_lr=cfg.optim.end_lr,
                           warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        metrics = {"train/lr": lr}
        if self.is_ttt:
            # Mid-training starts from a meta-trained W_0: the inner lr stays at the model's own
            # (no warmup), which is also what the rollout engines use, so π_old and π_θ agree.
            metrics["ttt/ilr"] = self.model.inner_lr

        windows = windows.to(self.device)
        loss = torch.zeros((), device=self.device)
        if rlp.ttt_weight > 0:
            ntp = next_token_loss(self.model, *split_window(windows, self.boundary_id))
            loss = loss + rlp.ttt_weight * ntp
            metrics["train/loss_ntp"] = ntp.item()
        thought_seq_tokens = 0
        if samples and rlp.rlp_weight > 0:
            ids, mask, old, adv = (t.to(self.device) for t in thought_batch(samples, self.think_open, self.pad_id))
            policy_loss, stats = rlp_policy_loss(self.model(ids).logits, ids, mask, old, adv, rlp.temperature,
                                                 rlp.clip_low, rlp.clip_high, rlp.is_cap)
            loss = loss + rlp.rlp_weight * policy_loss
            thought_seq_tokens = ids.numel()
            metrics.update(stats)
            metrics["train/loss_rlp"] = policy_loss.item()

        data_tokens = windows[:, 1:].numel()
        self.counters["tokens/data"] += data_tokens
        self.counters["tokens/thought"] += sum(r.thought_tokens for r in fresh)
        seq_len = windows.shape[1] - 1
        # Learner: forward+backward over windows and thought sequences; rollouts: forward only (1/3).
        fpt = flops_per_token(self.model, seq_len)
        rollout_tokens = sum(r.context_tokens + r.thought_tokens for r in rollouts)
        self.counters["flops/total"] += fpt * (data_tokens + thought_seq_tokens) + fpt / 3 * rollout_tokens

        if not torch.isfinite(loss):
            self.counters["train/skipped_steps"] += 1
            self.optimizer.zero_grad(set_to_none=True)
            return {**metrics, **self.counters, "train/loss": float("nan")}
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        self.version += 1

        rewards = [r for ro in fresh for r in ro.rewards]
        closed = sum(r.closed for r in fresh)
        metrics.update({
            "train/loss": loss.item(), "train/grad_norm": grad_norm.item(),
            "rlp/reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
            "rlp/reward_pos_frac": sum(r > 0 for r in rewards) / len(rewards) if rewards else float("nan"),
            "rlp/adv_abs_mean": sum(abs(s.advantage) for s in samples) / len(samples) if samples else float("nan"),
            "rlp/thought_len": sum(len(s.thought) for s in samples) / len(samples) if samples else float("nan"),
            "rlp/closed_frac": closed / thoughts if (thoughts := sum(r.thoughts for r in fresh)) else float("nan"),
            "rlp/samples": len(samples),
            "sync/version_lag": (sum(self.version - 1 - r.version for r in fresh) / len(fresh)) if fresh else float("nan"),
            "perf/learner_tokens_per_s": (data_tokens + thought_seq_tokens) / (time.perf_counter() - start),
        })
        return {**metrics, **self.counters}

    @torch.no_grad()
    def update_ema(self) -> None:
        tau = self.cfg.rlp.ema_decay
        for phi, theta in zip(self.ema.parameters(), self.model.parameters()):
            phi.lerp_(theta.detach(), 1 - tau)

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """CPU copies of the policy and EMA weights, and the version they are."""

        def cpu(m):
            return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}

        return cpu(self.model), cpu(self.ema), self.version

    def evaluate(self) -> dict:
        metrics = heldout_bpb(self.model, self.heldout_windows, self.token_bytes, self.cfg.train.batch_size, self.device,
                              boundary_id=self.boundary_id)
        if self.task_eval is not None:
            metrics.update(self.task_eval(self.model))
        return {**metrics, **self.counters}

    # ------------------------------------------------------------------------------- checkpoint
    def save(self, extra: dict | None = None) -> str:
        """`extra`: the driver's own state (loader, RNGs, the workers' generators), saved with ours."""
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "version": self.version, "counters": self.counters, "rng": rng_state(), "extra": extra or {}}
        path = save_checkpoint(self.run_dir, self.version, state)
        save_model(self.model, self.run_dir / "model")
        return str(path)

    def resume(self) -> dict | None:
        """Load this run's newest readable checkpoint; returns the extra state saved with it, or None."""
        found = load_latest_checkpoint(self.run_dir)
        if found is None:
            return None
        state = found[1]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self.counters = state["version"], state["counters"]
        set_rng_state(state["rng"])
        return {"version": self.version, **state["extra"]}

    def get_version(self) -> int:
        return self.version

    def sees(self, path: str) -> bool:
        """Whether `path`, written by the driver, is visible here (on another node it needs shared storage)."""
        return Path(path).exists()
