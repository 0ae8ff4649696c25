"""The RLP loop on the driver (training/graph.py builds the graph and hands it here).

One step is a flat sequence of named, timed phases:

    rollout   gather this step's rollouts; with rollout.async, submit the NEXT step's before training
    train     the learner's one backward through L = w_rlp·L_RLP + λ·L_NTP
    sync      the new weights to every worker (behind any rollout in flight: actor tasks keep order)
    eval      [every train.eval_every]
    save      [every train.save_every] after the step's metrics record, so both survive a kill
              (learner.async_save: written while the next step's rollouts run; it counts once whole)

With rollout.async the next step's thoughts are sampled while the learner trains, by weights one
version old: the learner drops rollouts more than rlp.max_staleness versions old and truncates the
importance ratio at rlp.is_cap (training/losses.py). The rollouts in flight at a checkpoint are
collected into it, with every generator, so a resumed run takes the steps an unkilled one takes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ray
from tqdm.auto import tqdm

from rollout.pool import Pending, RolloutPool
from rollout.sync import weight_sync
from training.checkpoint import rng_state, set_rng_state
from training.config import ConfigError
from training.data import WindowLoader
from training.metrics import MetricsLogger, first_bpb, read_metrics, trim_records
from training.trainer import timed

CLOSED_FRAC_WARNING = 0.5  # below this share of self-closed thoughts at the first step, the base cannot think
CANNOT_THINK = ("the base cannot think, and RLP's information gain will be strongly negative. Start from a base trained "
                "on thoughts (leave base= empty, pretrain.augment=think), warm a given base up first (warmup.steps=N), "
                "or raise rlp.thought_max_tokens.")


class DroppedRewardsError(RuntimeError):
    """Most rewards were dropped (raised, NaN, None) for several steps in a row: the run stops."""


class RLPLoop:
    def __init__(self, cfg, learner, pool: RolloutPool, loader: WindowLoader, cannot_think: str = CANNOT_THINK):
        self.cfg, self.learner, self.pool, self.loader = cfg, learner, pool, loader
        self.cannot_think = cannot_think  # what the first step's warning says when few thoughts close
        self.dropped_streak, self.first_drop = 0, ""  # consecutive steps over rlp.max_dropped_frac
        self.ahead = None  # (windows, Pending | list[Rollouts] | None): the next step's rollouts

    # ------------------------------------------------------------------------------ rollouts
    def submit(self):
        """The next batch of windows and its rollouts, submitted (none without the RLP term)."""
        windows = self.loader.next_batch()
        return windows, self.pool.submit(windows) if self.cfg.rlp.rlp_weight > 0 else None

    def collect(self, ahead) -> tuple:
        windows, rollouts = ahead
        if isinstance(rollouts, Pending):
            rollouts = self.pool.gather(rollouts)
        return windows, rollouts or []

    # ---------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        if self.ahead is not None:  # the rollouts in flight become part of the checkpoint
            self.ahead = self.collect(self.ahead)
        return {"loader": self.loader.state_dict(), "rng": rng_state(), "ahead": self.ahead,
                "workers": self.pool.rng_states(), "pool": self.pool.state_dict(),
                "dropped_streak": self.dropped_streak, "first_drop": self.first_drop}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        if "rng" in state:  # checkpoints of older runs hold the loader only
            set_rng_state(state["rng"])
            self.pool.set_rng_states(state["workers"])
            self.dropped_streak, self.first_drop = state["dropped_streak"], state["first_drop"]
        self.ahead = state.get("ahead")
        self.pool.load_state_dict(state.get("pool", {}))
        self.pool.sync.push()

    # ---------------------------------------------------------------------------------- loop
    def check_dropped(self, frac: float, rollouts, step: int) -> None:
        """Count steps whose dropped-reward fraction is over the limit; raise after too many in a row."""
        rlp = self.cfg.rlp
        if frac <= rlp.max_dropped_frac:
            self.dropped_streak, self.first_drop = 0, ""
            return
        self.dropped_streak += 1
        self.first_drop = self.first_drop or next((r.first_drop for r in rollouts if r.first_drop), "")
        if self.dropped_streak >= rlp.max_dropped_steps:
            raise DroppedRewardsError(
                f"reward={self.cfg.reward} dropped more than rlp.max_dropped_frac={rlp.max_dropped_frac} of the rewards "
                f"for {self.dropped_streak} steps in a row (to step {step}); the first drop: {self.first_drop}")

    def run(self, logger: MetricsLogger, start: int, first_extra: dict) -> dict:
        t, learner, asynchronous = self.cfg.train, self.learner, self.cfg.rollout.asynchronous
        first = learner.get(learner.evaluate.remote())
        if start == 0:
            logger.log({**first, **first_extra}, step=0)
        tqdm.write(f"version {start}: held-out bpb {first['eval/bpb']:.4f}")
        last_eval, metrics = first, {}
        for step in tqdm(range(start + 1, t.steps + 1), desc="rlp", unit="step", initial=start, total=t.steps):
            timings: dict[str, float] = {}
            with timed(timings, "rollout"):
                windows, rollouts = self.collect(self.ahead or self.submit())
                self.ahead = self.submit() if asynchronous and step < t.steps else None
            # Rewards are computed inside the workers; report their share of the rollout phase.
            timings["timing_s/reward"] = max((r.timings["timing_s/reward"] for r in rollouts), default=0.0)
            with timed(timings, "train"):
                metrics = learner.get(learner.train_step.remote(rollouts, windows))
            with timed(timings, "sync"):
                self.pool.sync.push(wait=not asynchronous)
            metrics.update(self.pool.counters())
            thought_tokens = sum(r.thought_tokens for r in rollouts)
            metrics["perf/rollout_tokens_per_s"] = thought_tokens / timings["timing_s/rollout"]
            log_thoughts(logger.path.parent, step, rollouts, metrics, first_step=step == 1, cannot_think=self.cannot_think)
            if step % t.eval_every == 0 or step == t.steps:
                with timed(timings, "eval"):
                    last_eval = learner.get(learner.evaluate.remote())
                metrics.update(last_eval)
            frac = sum(r.dropped for r in rollouts) / max(1, sum(r.positions for r in rollouts) * self.cfg.rlp.group_size)
            metrics["rollouts/dropped_reward_frac"] = frac
            try:
                self.check_dropped(frac, rollouts, step)
            finally:  # the failing step's record is written too
                if step % t.log_every == 0 or "eval/bpb" in metrics or self.dropped_streak:
                    logger.log({**metrics, **timings}, step=step)
            if step % t.save_every == 0 or step == t.steps:  # after the step's record: both survive a kill
                logger.sync()
                # The last checkpoint is whole before the run ends; the others are written as it goes on.
                learner.get(learner.save.remote(self.state_dict(), step == t.steps))  # wait: the last
        logged = read_metrics(logger.path)  # the whole run's records, those before a resume included
        start_bpb = first_bpb(logged) or first["eval/bpb"]
        tqdm.write(f"version {t.steps}: held-out bpb {last_eval['eval/bpb']:.4f} (start {start_bpb:.4f})")
        summary = {"bpb_start": start_bpb, **metrics, **last_eval}
        # As logged: train.log_every.
        records = [r for r in logged if r.get("rlp/reward_mean") is not None]
        gains, closed = [r["rlp/reward_mean"] for r in records], [r["rlp/closed_frac"] for r in records]
        if gains:
            k = max(1, len(gains) // 4)  # the first and last quarter of the steps, averaged: one step is noisy
            early, late = sum(gains[:k]) / k, sum(gains[-k:]) / k
            summary["rlp/thinking"] = (f"rlp/closed_frac {closed[0]:.2f} at the first step, {closed[-1]:.2f} at the last; "
                                       f"mean information gain {early:+.4f} -> {late:+.4f} nats (change {late - early:+.4f}, "
                                       f"first and last {k} steps)")
        return summary


def run_graph(cfg, learner, workers: list, data, run_dir: Path, cannot_think: str = CANNOT_THINK) -> dict:
    """Drive a built graph (a learner group and its rollout workers) through cfg.train.steps: the
    pool, the weight sync, the loop over the train windows, resumed at the last checkpoint when
    cfg.resume, metrics into run_dir. Returns the loop's summary."""
    if not ray.get(learner.sees.remote(str(run_dir / "config.yaml"))):
        raise ConfigError(f"the learner runs on another node and cannot see {run_dir}: on several nodes "
                          "give out_dir=<a path on a filesystem every node sees>")
    timeout_s = cfg.rollout.timeout_s
    pool = RolloutPool(workers, timeout_s, sync=weight_sync(cfg.sync, learner, workers, timeout_s))
    loop = RLPLoop(cfg, learner, pool, WindowLoader(data.train_windows, cfg.rollout.windows_per_step, cfg.seed),
                   cannot_think)
    resumed = ray.get(learner.resume.remote()) if cfg.resume else None
    if resumed is not None:
        loop.load_state_dict(resumed)
        trim_records(run_dir / "thoughts.jsonl", resumed["version"])  # as the metrics: steps past it come again
        print(f"resumed {run_dir} at version {resumed['version']}")
    logger = MetricsLogger(run_dir, config=dataclasses.asdict(cfg), wandb_mode=cfg.wandb.mode,
                           project=cfg.wandb.project, entity=cfg.wandb.entity, run_name=cfg.run_name,
                           resume_step=resumed["version"] if resumed else None)
    try:
        return loop.run(logger, start=resumed["version"] if resumed else 0,
                        first_extra={"data/docs_skipped": data.docs_skipped})
    finally:
        logger.close()


def log_thoughts(run_dir: Path, step: int, rollouts: list, metrics: dict, first_step: bool,
                 cannot_think: str = CANNOT_THINK) -> None:
    """Append the step's example thoughts to thoughts.jsonl (the report's table), and warn loudly
    when the base cannot think: RLP's reward needs thoughts the policy closes itself."""
    examples = [e for r in rollouts for e in r.examples]
    if examples:
        with open(Path(run_dir) / "thoughts.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "examples": examples}) + "\n")
    if first_step and metrics.get("rlp/closed_frac", 1.0) < CLOSED_FRAC_WARNING:
        tqdm.write(f"WARNING: the policy closed only {metrics['rlp/closed_frac']:.0%} of its thoughts at the first step: "
                   + cannot_think)
