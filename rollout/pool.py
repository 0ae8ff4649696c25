"""The rollout workers as one pool, seen from the driver: shards of windows out, Rollouts back,
through worker deaths and hangs.

    pool = RolloutPool(workers, timeout_s=600, sync=weight_sync(cfg.sync, learner, workers, 600))
    pending = pool.submit(windows)          # returns at once: the workers sample in the background
    rollouts = pool.gather(pending)         # waits; a dead worker's shard is retried after Ray restarts it

A worker is a Ray actor created with `max_restarts`: when its process dies, Ray starts it again
from its constructor (the base weights), so before it samples its next shard (a retried one, or the
next step's when it died idle) it loads the weights the learner last sent (`pool.sync`, rollout/sync.py). A worker that does not
answer within `timeout_s` is left out of the step (its shard is dropped). Both are counted:
`rollouts/worker_restarts`, `rollouts/worker_timeouts`. A sync that cannot take a restarted process
back (sync.method=collective) makes a worker's death stop the run (resume=true).
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


class WorkerLost(AllWorkersFailed):
    """A worker died while the weights travel by a collective it can no longer join."""


@dataclass
class Pending:
    shards: list[torch.Tensor]
    futures: list  # one ObjectRef per worker
    restores: list  # per worker: whether a new life of it had to load the weights first


class RolloutPool:
    def __init__(self, workers: list, timeout_s: float, sync: ObjectStoreSync | CollectiveSync, max_retries: int = 2):
        self.workers, self.timeout_s, self.sync, self.max_retries = workers, timeout_s, sync, max_retries
        self.restarts = self.timeouts = 0

    def submit(self, windows: torch.Tensor) -> Pending:
        shards = list(windows.chunk(len(self.workers)))
        # An actor runs its tasks in order: a life that has loaded no weights (Ray restarted it, even
        # while idle) loads the last ones sent before it samples. The references travel unresolved.
        weights = self.sync.last_sent()
        restores = [w.restore_weights.remote(weights) for w in self.workers]
        return Pending(shards, [w.rollout.remote(s) for w, s in zip(self.workers, shards)], restores)

    def gather(self, pending: Pending) -> list[Rollouts]:
        rollouts = []
        for i, (shard, future) in enumerate(zip(pending.shards, pending.futures)):
            for attempt in range(self.max_retries + 1):
                try:
                    rollouts.append(ray.get(future, timeout=self.timeout_s))
                    with contextlib.suppress(ray.exceptions.RayError):
                        self.restarts += bool(ray.get(pending.restores[i], timeout=self.timeout_s))
                    break
                except ray.exceptions.GetTimeoutError:
                    self.timeouts += 1
                    ray.cancel(future, force=False)
                    break
                except ray.exceptions.RayActorError:  # died (or is restarting): retry the shard on its next life
                    if not self.sync.survives_worker_death:
                        raise WorkerLost(f"rollout worker {i} died and sync.method=collective cannot take its next life "
                                         "into the broadcast group; resume=true continues from the last checkpoint "
                                         "(sync.method=object_store survives worker deaths)") from None
                    if attempt == self.max_retries:
                        break
                    self.restarts += 1
                    future = self._restore(self.workers[i]).rollout.remote(shard)
        if not rollouts:
            raise AllWorkersFailed(f"none of the {len(self.workers)} rollout workers returned rollouts for this step "
                                   f"(restarts {self.restarts}, timeouts {self.timeouts}); resume=true continues "
                                   "from the last checkpoint")
        return rollouts

    def _restore(self, worker):
        """A restarted worker gets the last weights sent (its constructor loaded the base's)."""
        weights = self.sync.last_sent()
        if weights is not None:
            self.call(worker, "load_weights", *weights)
        return worker

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
