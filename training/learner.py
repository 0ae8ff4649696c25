"""The RLP Learner (a Ray actor in pipelines/rlp_midtrain.py).

One step is one graph and one backward:

    loss = w_rlp · L_RLP(thought tokens, advantages)  +  λ · L_NTP(windows)

L_RLP is computed on [x_<t ; <think> ; c_i], so with TTT-E2E the thought's log-probabilities
come from fast weights already adapted on x_<t, and its gradient reaches the slow weights (and
W_0) through the inner loop; L_NTP is the next-token (meta-learning) loss over the windows. After
the optimiser step the EMA teacher moves (φ ← τφ + (1-τ)θ) and the policy version rises by one.

With learner.num_ranks > 1 every rank is one Learner in a torch.distributed group
(training/learner_group.py starts them): policy and EMA sharded alike with FSDP2, each rank
trains its share of the global batch, weighted so that the averaged gradient is the one-process
gradient of the whole batch. The EMA is sharded like the policy: it only moves elementwise and
is gathered when the engines need it, so it costs each rank 1/N of a model.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from models.hf import flops_per_token, is_ttt, next_token_loss
from rollout.sync import WeightBroadcast, ray_device, to_wire
from rollout.rollouts import Rollouts
from training import distributed
from training.checkpoint import load_latest_checkpoint, rng_state, save_model, set_rng_state, writing
from training.data import split_window
from training.evaluate import heldout_bpb
from training.losses import rlp_policy_loss, thought_batch
from training.optim import build_optimizer, warmup_cosine


class Learner:
    def __init__(self, cfg, model_dir: str, run_dir: str, heldout_windows: torch.Tensor, token_bytes: torch.Tensor,
                 think_open: int, pad_id: int, device: str | None = "cpu", task_eval=None,
                 initial_counters: dict[str, float] | None = None, group: dict | None = None):
        """initial_counters: tokens/data and flops/total spent before this run (its base model's
        pretraining), so the curves of a run that pretrained its own base start where it ended.
        device None: the one Ray assigned this actor. group: {rank, world, addr, port} of this
        rank's process group (given: the model is sharded over the group)."""
        import models  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModelForCausalLM

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = ray_device() if device is None else torch.device(device)
        self.rank, self.world = (group["rank"], group["world"]) if group else (0, 1)
        if group:
            distributed.init_group(self.rank, self.world, group["addr"], group["port"], self.device)
        self.saver = distributed.ShardedSaver(cfg.learner.async_save)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)  # φ ← θ at the first step
        if distributed.is_distributed():
            distributed.shard(self.model, self.device, cfg.dtype)
            distributed.shard(self.ema, self.device)
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
        with writing(self.run_dir / "checkpoints"):  # the last save's write had the rollouts' time to end
            self.saver.wait()
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

        # This rank's share of the global batch (all of it with one rank); each term is scaled by
        # its share of the global count it averages over, so the ranks' mean gradient is exact.
        local = windows.chunk(self.world)[self.rank].to(self.device)
        loss, terms = torch.zeros((), device=self.device), {}
        if rlp.ttt_weight > 0:
            inputs, targets = split_window(local, self.boundary_id)
            per_row = getattr(self.model.config, "loss_average", "token") == "chunk"  # mean over sequences
            ntp = next_token_loss(self.model, inputs, targets) * self.share(
                len(targets) if per_row else (targets != -100).sum().item())
            loss = loss + rlp.ttt_weight * ntp
            terms["train/loss_ntp"] = ntp.item()
        thought_seq_tokens = 0
        if len(samples) >= self.world and rlp.rlp_weight > 0:  # every rank needs a thought to stay in step
            mine = distributed.split(samples, self.rank, self.world)
            ids, mask, old, adv = (t.to(self.device) for t in thought_batch(mine, self.think_open, self.pad_id))
            policy_loss, stats = rlp_policy_loss(self.model(ids).logits, ids, mask, old, adv, rlp.temperature,
                                                 rlp.clip_low, rlp.clip_high, rlp.is_cap)
            policy_loss = policy_loss * self.share(len(mine))
            loss = loss + rlp.rlp_weight * policy_loss
            thought_seq_tokens = distributed.all_sum(ids.numel(), self.device)
            metrics.update(stats)  # rank 0's share
            terms["train/loss_rlp"] = policy_loss.item()
        terms = distributed.all_mean({**terms, "train/loss": loss.item()}, self.device)
        loss_value = terms.pop("train/loss")
        metrics.update(terms)

        data_tokens = windows[:, 1:].numel()
        self.counters["tokens/data"] += data_tokens
        self.counters["tokens/thought"] += sum(r.thought_tokens for r in fresh)
        seq_len = windows.shape[1] - 1
        # Learner: forward+backward over windows and thought sequences; rollouts: forward only (1/3).
        fpt = flops_per_token(self.model, seq_len)
        rollout_tokens = sum(r.context_tokens + r.thought_tokens for r in rollouts)
        self.counters["flops/total"] += fpt * (data_tokens + thought_seq_tokens) + fpt / 3 * rollout_tokens

        if not math.isfinite(loss_value):  # the mean over ranks: all skip together
            self.counters["train/skipped_steps"] += 1
            self.optimizer.zero_grad(set_to_none=True)
            return {**metrics, **self.counters, "train/loss": float("nan")}
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor across ranks
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        self.version += 1

        rewards = [r for ro in fresh for r in ro.rewards]
        closed = sum(r.closed for r in fresh)
        metrics.update({
            "train/loss": loss_value, "train/grad_norm": grad_norm.item(),
            "rlp/reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
            "rlp/reward_pos_frac": sum(r > 0 for r in rewards) / len(rewards) if rewards else float("nan"),
            "rlp/adv_abs_mean": sum(abs(s.advantage) for s in samples) / len(samples) if samples else float("nan"),
            "rlp/thought_len": sum(len(s.thought) for s in samples) / len(samples) if samples else float("nan"),
            "rlp/closed_frac": closed / thoughts if (thoughts := sum(r.positions for r in fresh) * rlp.group_size)
            else float("nan"),
            "rlp/samples": len(samples),
            "sync/version_lag": (sum(self.version - 1 - r.version for r in fresh) / len(fresh)) if fresh else float("nan"),
            "perf/learner_tokens_per_s": (data_tokens + thought_seq_tokens) / (time.perf_counter() - start),
        })
        return {**metrics, **self.counters}

    def share(self, count: float) -> float:
        """world · count / (the count over all ranks): a local mean times this, averaged over the
        ranks, is the mean over the global batch."""
        if not distributed.is_distributed():
            return 1.0
        total = distributed.all_sum(count, self.device)
        return self.world * count / total if total else 0.0

    @torch.no_grad()
    def update_ema(self) -> None:
        tau = self.cfg.rlp.ema_decay
        for phi, theta in zip(self.ema.parameters(), self.model.parameters()):
            phi.lerp_(theta.detach(), 1 - tau)

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """CPU copies of the policy and EMA weights, and the version they are (gathered from every
        rank: whole on rank 0, empty on the others)."""

        def cpu(m):
            if distributed.is_distributed():
                return distributed.full_state(m)
            return {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}

        return cpu(self.model), cpu(self.ema), self.version

    def wire_weights(self) -> tuple[dict, dict, int]:
        """weights() as the object store carries them fastest (rollout/sync.py: to_wire)."""
        policy, ema, version = self.weights()
        return to_wire(policy), to_wire(ema), version

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port, for a process group rank 0 hosts."""
        return distributed.free_address()

    def join_sync(self, addr: str, port: int, world: int, bucket_mb: float, timeout_s: float) -> None:
        """Rank 0 opens the weight broadcast to the engines (sync.method=collective) as its member 0."""
        if self.rank == 0:
            self.sync = WeightBroadcast(addr, port, 0, world, self.device, bucket_mb, timeout_s)

    def broadcast_weights(self) -> int:
        """Policy and EMA, gathered from every rank, broadcast by rank 0 to every engine; the version."""
        policy, ema, version = self.weights()
        if self.rank == 0:
            self.sync.send([policy, ema], version)
        return version

    def plain_model(self):
        """The policy as one unsharded CPU model on rank 0 (None on the others); every rank calls it."""
        if not distributed.is_distributed():
            return self.model
        from transformers import AutoModelForCausalLM

        state = distributed.full_state(self.model)
        if self.rank:
            return None
        model = AutoModelForCausalLM.from_config(self.model.config)  # on the CPU: buffers made, not loaded
        model.load_state_dict(state)
        return model.eval()

    def evaluate(self) -> dict:
        # Every rank runs the same held-out batches (the sharded forward is collective).
        metrics = heldout_bpb(self.model, self.heldout_windows, self.token_bytes, self.cfg.train.batch_size, self.device,
                              boundary_id=self.boundary_id)
        if self.task_eval is not None:  # decoding reads W_0 outside forward: on a whole model, on rank 0
            model = self.plain_model()
            if model is not None:
                metrics.update(self.task_eval(model.to(self.device)))
        return {**metrics, **self.counters}

    # ------------------------------------------------------------------------------- checkpoint
    def save(self, extra: dict | None = None, wait: bool = True) -> str:
        """`extra`: the driver's own state (loader, RNGs, the workers' generators), saved with ours.
        Without `wait` (learner.async_save) the shards are written while the next step's rollouts
        run, and the checkpoint becomes the newest at the start of the next train_step."""
        # DCP: every rank writes its shards, and any number of ranks reads them; model/ is gathered on rank 0.
        state = {"version": self.version, "counters": self.counters, "rng": rng_state(), "extra": extra or {}}
        with writing(self.run_dir / "checkpoints"):
            path = self.saver.save(self.run_dir, self.version, state,
                                   distributed.sharded_state(self.model, self.ema, self.optimizer))
            if wait:
                self.saver.wait()
        model = self.plain_model()
        if model is not None:
            with writing(self.run_dir / "model"):
                save_model(model, self.run_dir / "model")
        return str(path)

    def resume(self) -> dict | None:
        """Load this run's newest readable checkpoint; returns the extra state saved with it, or None."""
        found = load_latest_checkpoint(self.run_dir)
        if found is None:
            return None
        path, state = found
        if state.get("sharded"):  # DCP: written by any number of ranks, read by this many
            distributed.load_sharded_state(path / "dcp", self.model, self.ema, self.optimizer)
        elif distributed.is_distributed():
            raise ValueError(f"checkpoint {path} is of the older single-file kind: resume it with learner.num_ranks=1")
        else:  # the single-file checkpoints of earlier versions
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
