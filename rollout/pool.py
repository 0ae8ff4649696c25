"""The rollout workers as one pool, seen from the driver: shards of windows out, Rollouts back,
through worker deaths and hangs.

    pool = RolloutPool(workers, timeout_s=600)
    pending = pool.submit(windows)          # returns at once: the workers sample in the background
    rollouts = pool.gather(pending)         # waits; a dead worker's shard is retried after Ray restarts it

A worker is a Ray actor created with `max_restarts`: when its process dies, Ray starts it again
from its constructor (the base weights), so before it samples its next shard (a retried one, or the
next step's when it died idle) it loads the weights the learner last sent (`sync`). A worker that does not answer within `timeout_s` is left out of the
step (its shard is dropped). Both are counted: `rollouts/worker_restarts`, `rollouts/worker_timeouts`.

Weights reach the workers through the object store, or (`start_collective`, sync.method=collective)
by learner rank 0's broadcast over a process group with every worker (rollout/sync.py). Such a
group cannot take a restarted process back: with it, a worker's death stops the run (resume=true).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import ray
import torch

from rollout.worker import Rollouts


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
    def __init__(self, workers: list, timeout_s: float, max_retries: int = 2):
        self.workers, self.timeout_s, self.max_retries = workers, timeout_s, max_retries
        self.weights = None  # the (policy, ema, version) refs last sent, for a restarted worker
        self.restarts = self.timeouts = 0
        self.collective = False

    def start_collective(self, learner, bucket_mb: float) -> None:
        """One process group: learner rank 0 (member 0, the group's host) and every worker."""
        addr, port = ray.get(learner.rendezvous.remote())
        world = 1 + len(self.workers)
        refs = [learner.join_sync.remote(addr, port, world, bucket_mb, self.timeout_s)]
        refs += [w.join_sync.remote(addr, port, i + 1, world, bucket_mb, self.timeout_s)
                 for i, w in enumerate(self.workers)]
        ray.get(refs)
        self.collective = True

    def submit(self, windows: torch.Tensor) -> Pending:
        shards = list(windows.chunk(len(self.workers)))
        # An actor runs its tasks in order: a life that has loaded no weights (Ray restarted it, even
        # while idle) loads the last ones sent before it samples. The references travel unresolved.
        weights = list(self.weights) if self.weights is not None else None
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
                    if self.collective:
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

    def sync(self, learner, wait: bool = True) -> None:
        """The learner's current policy and EMA weights into every worker (object store, once).
        Without `wait` they land behind any rollout in flight (an actor runs its tasks in order)."""
        if self.collective:  # learner rank 0 broadcasts, every worker receives
            refs = [learner.broadcast_weights.remote()] + [w.receive_weights.remote() for w in self.workers]
            if wait:
                ray.get(refs)
            return
        self.weights = learner.weights.options(num_returns=3).remote()
        refs = [w.load_weights.remote(*self.weights) for w in self.workers]
        for ref in refs if wait else ():
            with contextlib.suppress(ray.exceptions.RayActorError):  # a dead worker is restored before its next shard
                ray.get(ref)

    def _restore(self, worker):
        """A restarted worker gets the last weights sent (its constructor loaded the base's)."""
        if self.weights is not None:
            self.call(worker, "load_weights", *self.weights)
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
