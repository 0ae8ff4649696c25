"""The rollout workers as one pool, seen from the driver: shards of windows out, Rollouts back,
through worker deaths and hangs.

    pool = RolloutPool(workers, timeout_s=600, sync=weight_sync(cfg.sync, learner, workers, 600))
    pending = pool.submit(windows)          # returns at once: the workers sample in the background
    rollouts = pool.gather(pending)         # waits; a dead worker's shard is retried after Ray restarts it

A worker is a Ray actor created with `max_restarts`: when its process dies, Ray starts it again
from its constructor (the base weights). Every shard is preceded by the pool's first call to a new
life (`restore_weights`), so a restart is seen whether the worker died busy or idle. The new life
holds the weights the learner last sent before its rollouts count: it loads them itself (object
store), or the sync re-forms its group and sends them (collective, rollout/sync.py), and its shard
is sampled again. A worker that does not answer within `timeout_s` is left out of the step (its
shard is dropped); if none answers, the step fails with AllWorkersFailed. Both are counted:
`rollouts/worker_restarts`, `rollouts/worker_timeouts`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import ray
import torch

from rollout.rollouts import Rollouts
from rollout.sync import CollectiveSync, ObjectStoreSync


class AllWorkersFailed(RuntimeError):
    """No rollout worker answered for a whole step."""


@dataclass
class Pending:
    shards: list[torch.Tensor]
    futures: list  # one ObjectRef per worker
    restores: list  # per worker: restore_weights' answer (a new life? holding the weights sent?)


class RolloutPool:
    def __init__(self, workers: list, timeout_s: float, sync: ObjectStoreSync | CollectiveSync, max_retries: int = 2):
        self.workers, self.timeout_s, self.sync, self.max_retries = workers, timeout_s, sync, max_retries
        self.restarts = self.timeouts = 0
        ray.get([w.restore_weights.remote(None) for w in workers])  # meet every worker's first life

    def submit(self, windows: torch.Tensor) -> Pending:
        shards = list(windows.chunk(len(self.workers)))
        # An actor runs its tasks in order: a new life loads the last weights sent before it samples.
        # The references travel unresolved.
        weights = self.sync.last_sent()
        restores = [w.restore_weights.remote(weights) for w in self.workers]
        return Pending(shards, [w.rollout.remote(s) for w, s in zip(self.workers, shards)], restores)

    def gather(self, pending: Pending) -> list[Rollouts]:
        rollouts = [r for i in range(len(self.workers)) if (r := self._gather_one(pending, i)) is not None]
        if not rollouts:
            raise AllWorkersFailed(f"none of the {len(self.workers)} rollout workers returned rollouts for this step "
                                   f"(restarts {self.restarts}, timeouts {self.timeouts}); resume=true continues "
                                   "from the last checkpoint")
        return rollouts

    def _gather_one(self, pending: Pending, i: int) -> Rollouts | None:
        """Worker i's rollouts of its shard, sampled by the weights last sent; None if it hung, or
        died more than max_retries times."""
        future, restore = pending.futures[i], pending.restores[i]
        for attempt in range(self.max_retries + 1):
            try:
                rollouts = ray.get(future, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                self.timeouts += 1
                ray.cancel(future, force=False)
                return None
            except ray.exceptions.RayActorError:  # died (or is restarting) while sampling: sample again
                pass
            else:
                new_life, has_weights = self._answer(restore)
                self.restarts += new_life
                # A new life that could not load the weights sent (collective) sampled with the base's.
                if not (new_life and not has_weights and self.sync.last_sent() is not None):
                    return rollouts
            if attempt == self.max_retries:
                return None
            with contextlib.suppress(ray.exceptions.RayActorError):  # died again: its rollout will say so
                self.restarts += self.call(self.workers[i], "restore_weights", self.sync.last_sent())[0]
            self.sync.readmit()
            future = self.workers[i].rollout.remote(pending.shards[i])
        return None

    def _answer(self, restore) -> tuple[bool, bool]:
        """restore_weights' answer; (False, True) if the life that gave it is gone."""
        try:
            return tuple(ray.get(restore, timeout=self.timeout_s))
        except ray.exceptions.RayError:
            return False, True

    def call(self, worker, method: str, *args):
        """worker.method(*args), waiting out a restart in progress (up to timeout_s)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get(getattr(worker, method).remote(*args), timeout=self.timeout_s)
            except ray.exceptions.ActorUnavailableError:  # restarting: its next life answers
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def rng_states(self) -> list[dict]:
        return [self.call(w, "rng_state") for w in self.workers]

    def set_rng_states(self, states: list[dict]) -> None:
        for w, state in zip(self.workers, states):
            self.call(w, "set_rng_state", state)

    def counters(self) -> dict[str, int]:
        return {"rollouts/worker_restarts": self.restarts, "rollouts/worker_timeouts": self.timeouts}

    def state_dict(self) -> dict:
        return {"restarts": self.restarts, "timeouts": self.timeouts}

    def load_state_dict(self, state: dict) -> None:
        self.restarts, self.timeouts = state.get("restarts", 0), state.get("timeouts", 0)
