"""The graph at scale: Ray resources and placement, each actor's device, the learner ranks'
torch.distributed group, FSDP2 sharding, and sharded (DCP) checkpoints.

One code path from a laptop to a GPU cluster: only the device (the GPU Ray assigned, else the
CPU) and the backend (NCCL on CUDA, gloo on CPU) differ.

    check_resources(need, ray.cluster_resources(), nodes)   # fails at start, naming what is missing
    pg = place(bundles, "pack", timeout_s)                   # a placement group, ready or an error
    device = rollout.sync.ray_device()                       # inside an actor
    init_group(rank, world, addr, port, device); shard(model, device, dtype)
"""

from __future__ import annotations

import socket
from pathlib import Path
from datetime import timedelta

import torch
import torch.distributed as dist

from training.config import ConfigError


class ResourceError(ConfigError):
    """The cluster cannot hold what the config asks for; the message names what is missing."""


# ------------------------------------------------------------------------------------ Ray resources


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def check_resources(groups: dict[str, list[dict]], total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError unless the cluster (`total`, and per node `nodes`) can hold every bundle
    of every group (name -> bundles), before any actor is created."""
    need: dict[str, float] = {}
    for bundles in groups.values():
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
    for k, v in need.items():
        if v > total.get(k, 0.0) + 1e-9:
            what = ", ".join(f"{name} {sum(b.get(k, 0) for b in bs):g}" for name, bs in groups.items())
            raise ResourceError(f"the config asks for {v:g} {k} ({what}) but the cluster has "
                                f"{total.get(k, 0.0):g} {k} (ray.cluster_resources(): "
                                f"{_fmt(total)}); lower the resource keys or add nodes")
    for name, bs in groups.items():
        for b in bs:
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in b.items()) for node in nodes):
                raise ResourceError(f"one {name} actor asks for {_fmt(b)} but no node has that much "
                                    f"(largest: {_fmt(max(nodes, key=lambda n: (n.get('GPU', 0), n.get('CPU', 0))))})")


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {res.get(k, 0):g}" for k in ("CPU", "GPU") if k in res or k == "CPU")


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def place(bundles: list[dict], strategy: str, timeout_s: float, name: str):
    """A placement group holding `bundles`, ready; a ResourceError after `timeout_s` (resources
    held by other jobs, say) instead of waiting in PENDING forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy.upper())
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ResourceError(f"the cluster did not place the {name} ({len(bundles)} x {_fmt(bundles[0])}, "
                            f"{strategy}) within {timeout_s:g} s; free: {_fmt(ray.available_resources())}") from None
    return pg


def in_bundle(pg, index: int) -> dict:
    """Actor options that put it into bundle `index` of `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=index)}


def free_address() -> tuple[str, int]:
    """This node's address and a free port (run inside rank 0's bundle: the group's rendezvous)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


# ----------------------------------------------------------------------------- torch.distributed


def is_distributed() -> bool:
    """Whether this process is one rank of a learner group (its process group is up): the one
    test every rank-dependent branch asks."""
    return dist.is_available() and dist.is_initialized()


def init_group(rank: int, world: int, addr: str, port: int, device: torch.device, timeout_s: float = 1800) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def shard(model: torch.nn.Module, device: torch.device, dtype: str = "float32") -> torch.nn.Module:
    """FSDP2 over the ranks: every prefix block a unit of its own, the rest (embedding, norms and
    the TTT-E2E suffix blocks) the root's. The suffix blocks stay with the root because the inner
    loop reads their fast-weight W_0 (initial_fast_weights) outside a block's forward: inside the
    root's forward they are whole tensors, so the meta-gradient is the single-process one.
    dtype=bfloat16: bf16 compute with fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    n_prefix = getattr(model, "n_prefix", None)
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        for block in list(blocks)[:n_prefix]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def split(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share of `items` (shares differ by at most one)."""
    q, r = divmod(len(items), world)
    start = rank * q + min(rank, r)
    return items[start: start + q + (rank < r)]


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every rank's values averaged (a no-op without a process group)."""
    if not is_distributed() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def all_sum(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# ------------------------------------------------------------------------------- DCP checkpoints


def sharded_state(model, ema, optimizer) -> dict:
    """Model, EMA and optimiser state as DCP reads and writes it: each rank its own shards, keyed
    by parameter name, so a checkpoint loads into any number of ranks (one included)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded_state(path, model, ema, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(model, ema, optimizer)  # the templates DCP fills in place
    dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state(model) -> dict:
    """The whole state dict on rank 0's CPU (empty on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardedSaver:
    """Writes checkpoints/step_<step>/: dcp/ (every rank's shards) and state.pt (rank 0's `state`:
    counters, RNGs, the driver's state), made whole in a temporary directory and renamed by rank 0
    once every rank's shards are written; until then the previous checkpoint is the newest. Without
    a process group one process writes all of it.

    asynchronous: save() copies the shards into CPU memory and returns; a thread writes them (over a
    gloo group of its own, so that DCP's collectives never meet the training's), and wait() (the
    learner's next train_step, or the next save) renames it into place. The copy costs the state's
    size in host memory.
    """

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self.group = dist.new_group(backend="gloo") if asynchronous and is_distributed() else None
        self.pending = None  # (future, tmp, final, keep) of the save being written

    def save(self, run_dir, step: int, state: dict, sharded: dict, keep: int = 2) -> Path:
        import torch.distributed.checkpoint as dcp

        from training.checkpoint import checkpoint_dirs, fresh_dir

        self.wait()
        final, tmp = checkpoint_dirs(run_dir, step)
        group = is_distributed()
        if not group or dist.get_rank() == 0:
            fresh_dir(tmp)
            torch.save({**state, "sharded": True}, tmp / "state.pt")
        if group:
            dist.barrier()
        if self.asynchronous:
            future = dcp.async_save(sharded, checkpoint_id=str(tmp / "dcp"), process_group=self.group, no_dist=not group)
            self.pending = (future, tmp, final, keep)
        else:
            dcp.save(sharded, checkpoint_id=str(tmp / "dcp"), no_dist=not group)
            self._commit(tmp, final, keep)
        return final

    def wait(self) -> None:
        """Finish the save being written (its errors are raised here) and make it the newest."""
        if self.pending is not None:
            future, tmp, final, keep = self.pending
            self.pending = None
            future.result()
            self._commit(tmp, final, keep)

    @staticmethod
    def _commit(tmp: Path, final: Path, keep: int) -> None:
        from training.checkpoint import commit_dir

        group = is_distributed()
        if group:
            dist.barrier()  # every rank's shards are written
        if not group or dist.get_rank() == 0:
            commit_dir(tmp, final, keep)
        if group:
            dist.barrier()
