"""How the learner's weights reach the rollout workers: one interface, two methods, chosen once
by `weight_sync(sync_cfg, learner, workers, timeout_s)`.

    sync.method=object_store   learner.weights() into Ray's object store once, as numpy arrays (which
                               it hands over without a copy); every worker reads it
    sync.method=collective     learner rank 0 broadcasts the weights in buckets of sync.bucket_mb over
                               one process group of its own joining it with every engine (NCCL on
                               GPU, gloo on CPU): no copy through the object store, one send per bucket

    sync = weight_sync(cfg.sync, learner, workers, timeout_s)
    sync.push(wait=True)     # the learner's current policy and EMA into every worker
    sync.last_sent()         # what a restarted worker loads itself before it samples (object store)
    sync.readmit()           # after a worker's restart: what it cannot load itself reaches it (collective)

Both survive a worker's death. Ray starts the worker again from its constructor (the base's
weights). With the object store the new life loads the last references sent. A process group
cannot take a new process into a dead one's place, so the collective forms a new group with the
new life and every other member (a new rendezvous) and sends the current weights through it; a
broadcast that fails because a member died does the same. A broadcast into a group with a dead
member can leave the living ones waiting out sync's timeout, so a push first asks Ray's control
store how often each worker was restarted: one restarted since the group formed has the group
formed again before anything is sent. Only a death during a broadcast waits out the timeout.

The learner side is an actor (or group) with wire_weights(), rendezvous(), join_sync() and
broadcast_weights() (training/learner.py); a worker has load_weights(), join_sync() and
receive_weights() (rollout/worker.py).

The broadcast carries the policy and the EMA teacher, each as the state dict's tensors in order
(the engines hold the same architecture, so the layout is known on both sides), after a header
[version, elements] that every receiver checks.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from datetime import timedelta

import numpy as np
import ray
import torch
import torch.distributed as dist


def ray_device() -> torch.device:
    """The device of the Ray actor this runs in: its first assigned GPU (Ray sets
    CUDA_VISIBLE_DEVICES to the GPUs it assigned), else the CPU."""
    return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped into runs of one dtype and at most bucket_bytes (or one tensor)."""
    out, size = [], 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if out and out[-1] and tensors[out[-1][0]].dtype == t.dtype and size + nbytes <= bucket_bytes:
            out[-1].append(i)
            size += nbytes
        else:
            out.append([i])
            size = nbytes
    return out


class WeightBroadcast:
    """One process group of `world` members: rank 0 the sender (learner rank 0), the engines the
    rest. A group of its own (a TCPStore at addr:port), apart from the learner ranks' group."""

    def __init__(self, addr: str, port: int, rank: int, world: int, device: torch.device, bucket_mb: float,
                 timeout_s: float = 1800):
        self.rank, self.device, self.bucket_bytes = rank, device, int(bucket_mb * 2**20)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
        if device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world, timeout)

    def _broadcast(self, t: torch.Tensor) -> None:
        self.group.broadcast(t, 0).wait()

    def send(self, states: list[dict[str, torch.Tensor]], version: int) -> None:
        tensors = [s[k].detach() for s in states for k in sorted(s)]
        self._broadcast(torch.tensor([version, sum(t.numel() for t in tensors)], device=self.device))
        for idx in buckets(tensors, self.bucket_bytes):
            self._broadcast(torch.cat([tensors[i].reshape(-1) for i in idx]).to(self.device))

    def receive(self, templates: list[dict[str, torch.Tensor]]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """Fresh tensors shaped like `templates` (the receiver's own state dicts), and the version."""
        header = torch.zeros(2, dtype=torch.long, device=self.device)
        self._broadcast(header)
        version, numel = header.tolist()
        keys = [(j, k) for j, s in enumerate(templates) for k in sorted(s)]
        tensors = [templates[j][k] for j, k in keys]
        if numel != sum(t.numel() for t in tensors):
            raise RuntimeError(f"weight broadcast of {numel} elements, but this engine's model has "
                               f"{sum(t.numel() for t in tensors)}: the learner and the engines hold different models")
        out: list[dict[str, torch.Tensor]] = [{} for _ in templates]
        for idx in buckets(tensors, self.bucket_bytes):
            flat = torch.empty(sum(tensors[i].numel() for i in idx), dtype=tensors[idx[0]].dtype, device=self.device)
            self._broadcast(flat)
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                j, k = keys[i]
                out[j][k] = piece.view(tensors[i].shape)
        return out, version


def to_wire(state: dict[str, torch.Tensor]) -> dict:
    """A CPU state dict as numpy arrays: Ray's object store holds those as they are and hands them
    to a reader without a copy, where it pickles a torch tensor through its bytes. bfloat16, which
    numpy lacks, travels as its int16 bits."""
    return {k: ("bfloat16", v.view(torch.int16).numpy()) if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()}


def from_wire(state: dict) -> dict[str, torch.Tensor]:
    """to_wire's state dict as tensors, bit for bit (tensors pass through). They share the object
    store's read-only memory: loading them into a model copies them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v[1]).view(torch.bfloat16) if isinstance(v, tuple)
                else torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


class ObjectStoreSync:
    """learner.wire_weights() (learner.weights() as numpy) put into the object store once per push;
    every worker loads the references. A restarted worker loads the last ones sent (`last_sent`)
    before it samples."""

    def __init__(self, learner, workers: list):
        self.learner, self.workers = learner, workers
        self.sent = None  # the (policy, ema, version) references last pushed

    def push(self, wait: bool = True) -> None:
        """Without `wait` the weights land behind any rollout in flight (an actor runs its tasks in order)."""
        self.sent = self.learner.wire_weights.options(num_returns=3).remote()
        refs = [w.load_weights.remote(*self.sent) for w in self.workers]
        for ref in refs if wait else ():
            with contextlib.suppress(ray.exceptions.RayActorError):  # a dead worker loads them in its next life
                ray.get(ref)

    def last_sent(self) -> list | None:
        return list(self.sent) if self.sent is not None else None

    def readmit(self) -> None:
        """Nothing: a new life loads last_sent() itself."""


class CollectiveSync:
    """One process group: learner rank 0 (member 0, the group's host) and every worker, formed
    again with every member after a worker's death."""

    def __init__(self, learner, workers: list, bucket_mb: float, timeout_s: float):
        self.learner, self.workers, self.bucket_mb, self.timeout_s = learner, workers, bucket_mb, timeout_s
        self.pending: list = []  # the refs of a push not waited for
        self.pushed = False
        self.groups = 0  # how many groups were formed (1 + the re-formations)
        self.join()

    def join(self) -> None:
        """A new group of every member at a new rendezvous, each joining behind its tasks in flight.
        A worker Ray is restarting is asked again until its next life answers."""
        addr, port = ray.get(self.learner.rendezvous.remote())
        world = 1 + len(self.workers)

        def join(i):  # member i + 1
            return self.workers[i].join_sync.remote(addr, port, i + 1, world, self.bucket_mb, self.timeout_s)

        pending = {self.learner.join_sync.remote(addr, port, world, self.bucket_mb, self.timeout_s): None}
        pending.update({join(i): i for i in range(len(self.workers))})
        while pending:  # every member blocks until all have joined: none is waited for alone
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise TimeoutError(f"the weight-broadcast group did not form within {self.timeout_s:g} s")
            i = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except ray.exceptions.ActorUnavailableError:  # restarting: its next life joins
                time.sleep(0.2)
                pending[join(i)] = i
        self.groups += 1
        self.lives = self._lives()

    def push(self, wait: bool = True) -> None:
        """Learner rank 0 broadcasts, every worker receives. A push that failed because a member
        died (this one, or an earlier one not waited for) is made again in a new group."""
        done = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)[0] if self.pending else []
        # A worker restarted since the group formed would leave the others' broadcast waiting out the
        # timeout: the group is formed again first.
        if self._failed(done) or self._lives() != self.lives:
            self.readmit()
            return
        self.pending, self.pushed = self._send(), True
        if wait and self._failed(self.pending):
            self.readmit()

    def readmit(self) -> None:
        """A new group with every worker's current life, then the current weights through it."""
        self._failed(self.pending)  # the broken group's pushes end first: a member inside one cannot join
        self.join()
        self.pending = []
        if self._failed(self._send()):
            raise RuntimeError("the weight broadcast failed in a group formed afresh")

    def _send(self) -> list:
        return [self.learner.broadcast_weights.remote()] + [w.receive_weights.remote() for w in self.workers]

    def _lives(self) -> list[int] | None:
        """How many times Ray has restarted each worker, as its control store (GCS) knows it; it asks
        no actor, so it never waits behind a rollout. None where this Ray does not say."""
        try:
            from ray._private.state import actors

            return [actors(w._actor_id.hex())["NumRestarts"] for w in self.workers]
        except Exception:  # a Ray without this table: a death is found when a broadcast fails
            return None

    @staticmethod
    def _failed(refs: list) -> bool:
        """Wait for refs; whether any failed (a member of the group died)."""
        failed = False
        for ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                failed = True
        return failed

    def last_sent(self) -> list | None:
        """Nothing a new life could load itself ([]: readmit it) once weights were sent, None before."""
        return [] if self.pushed else None


def weight_sync(sync_cfg, learner, workers: list, timeout_s: float) -> ObjectStoreSync | CollectiveSync:
    """The weight sync that sync_cfg.method names (sync_cfg.bucket_mb for the collective)."""
    if sync_cfg.method == "collective":
        return CollectiveSync(learner, workers, sync_cfg.bucket_mb, timeout_s)
    return ObjectStoreSync(learner, workers)
