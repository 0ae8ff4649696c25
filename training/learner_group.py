"""The learner's ranks seen from the driver as one actor.

    group = start_learners(cfg.learner, args, kwargs)      # placed, process group joined
    group.get(group.train_step.remote(rollouts, windows))  # runs on every rank; rank 0's result

Every call goes to every rank (their collectives must meet) with its arguments put into the
object store once; the driver gets rank 0's ObjectRef, exactly as from one Learner actor, so the
loop and the rollout pool need not know how many ranks there are. An error on another rank is
raised at the next call.
"""

from __future__ import annotations

import ray

from training import distributed
from training.learner import Learner


class _Method:
    def __init__(self, group: "LearnerGroup", name: str, options: dict | None = None):
        self.group, self.name, self.opts = group, name, options or {}

    def options(self, **options) -> "_Method":
        return _Method(self.group, self.name, options)

    def remote(self, *args):
        return self.group.call(self.name, self.opts, args)


class LearnerGroup:
    def __init__(self, ranks: list, placement=None):
        self.ranks, self.placement = ranks, placement
        self.others: list = []  # the other ranks' refs not yet checked for errors

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def call(self, name: str, options: dict, args: tuple):
        self.check()
        if len(self.ranks) > 1:  # one copy in the object store for all ranks
            args = tuple(a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args)
        refs = [getattr(r, name).options(**options).remote(*args) for r in self.ranks]
        for ref in refs[1:]:
            self.others.extend(ref if isinstance(ref, list) else [ref])
        return refs[0]

    def check(self, timeout: float = 0) -> None:
        """Raise the first error of another rank's call finished within `timeout` seconds."""
        if self.others:
            done, self.others = ray.wait(self.others, num_returns=len(self.others), timeout=timeout)
            ray.get(done)

    def get(self, ref):
        """ray.get(ref) of rank 0's result. If it failed, another rank's error is raised first when
        there is one: a rank that died leaves rank 0 with only a broken connection to report."""
        try:
            return ray.get(ref)
        except Exception:
            self.check(timeout=30)
            raise


def learner_bundles(cfg) -> list[dict]:
    return [distributed.bundle(cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank)] * cfg.learner.num_ranks


def start_learners(cfg, pg, *args, **kwargs) -> LearnerGroup:
    """cfg.learner.num_ranks Learner actors in the bundles of `pg`, joined in one process group
    whose rendezvous is a free port on rank 0's node."""
    n = cfg.learner.num_ranks
    group = None
    if n > 1:
        rendezvous = ray.remote(distributed.free_address).options(num_cpus=0, **distributed.in_bundle(pg, 0))
        addr, port = ray.get(rendezvous.remote())
        group = {"world": n, "addr": addr, "port": port}
    actor = ray.remote(Learner)
    ranks = [actor.options(num_cpus=cfg.learner.cpus_per_rank, num_gpus=cfg.learner.gpus_per_rank,
                           **distributed.in_bundle(pg, i)).remote(*args, **kwargs, device=None,
                                                                  group=group and {**group, "rank": i})
             for i in range(n)]
    return LearnerGroup(ranks, pg)
