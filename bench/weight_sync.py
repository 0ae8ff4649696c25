"""Weight sync from the learner to the rollout engines: the object store against a bucketed
broadcast (rollout/sync.py), by model size, and sync's share of a learner step.

Each sync carries what the pipeline's does: the policy and the EMA teacher, from a learner actor
into every engine actor's models. object_store: learner.weights() into the object store once as
numpy arrays (rollout/sync.py: to_wire), each engine gets both and loads them; object_store
(tensors): the same with torch tensors, which Ray pickles through their bytes. collective: learner
rank 0 broadcasts them in buckets of --bucket-mb over a gloo (CPU) or NCCL (GPU) group. The step is
one learner optimiser step on --windows windows of --seq tokens (next-token term only) of the same
model.

    python bench/weight_sync.py                               # tiny and 125m, 2 engines, CPU
    python bench/weight_sync.py --models tiny 125m 1b --engines 4 --gpus 1   # a GPU node
    python bench/weight_sync.py --models ~/ponder/models/smollm2-135m --engines 1   # a saved model
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build(shape: str):
    """A Ponder model of a configs/model shape, or a saved model directory."""
    from models import PonderConfig, PonderForCausalLM

    if Path(shape).expanduser().is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(Path(shape).expanduser())
    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{shape}.yaml"))
    fields.pop("name")
    fields["vocab_size"] = fields.get("vocab_size") or 4096
    torch.manual_seed(0)
    return PonderForCausalLM(PonderConfig(**fields))


class Side:
    """A learner (member 0) or an engine: a policy and an EMA copy, on the device Ray gave it."""

    def __init__(self, shape: str):
        from rollout.sync import ray_device

        torch.set_num_threads(1)
        self.device = ray_device()
        self.model = build(shape).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weights(self, wire: bool = True):
        from rollout.sync import to_wire

        states = [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in (self.model, self.ema)]
        return tuple(map(to_wire, states)) if wire else tuple(states)

    def load(self, policy, ema) -> None:
        from rollout.sync import from_wire

        self.model.load_state_dict(from_wire(policy))
        self.ema.load_state_dict(from_wire(ema))

    def join(self, addr, port, rank, world, bucket_mb) -> None:
        from rollout.sync import WeightBroadcast

        self.sync = WeightBroadcast(addr, port, rank, world, self.device, bucket_mb)

    def send(self, version: int) -> None:
        self.sync.send([self.model.state_dict(), self.ema.state_dict()], version)

    def receive(self) -> int:
        (policy, ema), version = self.sync.receive([self.model.state_dict(), self.ema.state_dict()])
        self.load(policy, ema)
        return version

    def step_s(self, windows: int, seq: int) -> float:
        """Seconds of one optimiser step on `windows` x `seq` tokens (the second of two)."""
        from models.hf import next_token_loss

        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        ids = torch.randint(0, self.model.config.vocab_size, (windows, seq + 1), device=self.device)
        for _ in range(2):
            t = time.perf_counter()
            next_token_loss(self.model, ids[:, :-1], ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t
        return took

    def address(self):
        from training.distributed import free_address

        return free_address()


def bench(shape: str, args) -> dict:
    actor = ray.remote(Side).options(num_cpus=0.5, num_gpus=args.gpus / (args.engines + 1))
    learner = actor.remote(shape)
    engines = [actor.remote(shape) for _ in range(args.engines)]
    params = ray.get(learner.params.remote())
    ray.get([e.params.remote() for e in engines])

    def object_store(wire: bool = True):
        refs = learner.weights.options(num_returns=2).remote(wire)
        ray.get([e.load.remote(*refs) for e in engines])

    addr, port = ray.get(learner.address.remote())
    world = 1 + len(engines)
    ray.get([learner.join.remote(addr, port, 0, world, args.bucket_mb)]
            + [e.join.remote(addr, port, i + 1, world, args.bucket_mb) for i, e in enumerate(engines)])

    def collective():
        ray.get([learner.send.remote(1)] + [e.receive.remote() for e in engines])

    out = {"model": Path(shape).name, "params_M": params / 1e6, "MB_per_sync": 2 * params * 4 / 2**20}
    for name, fn in (("object_store", object_store), ("tensors", lambda: object_store(wire=False)),
                     ("collective", collective)):
        times = []
        for _ in range(args.repeats + 1):  # the first warms up
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = sorted(times[1:])[len(times[1:]) // 2]
    out["step"] = ray.get(learner.step_s.remote(args.windows, args.seq))
    for a in [learner, *engines]:
        ray.kill(a)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "125m"])
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--gpus", type=float, default=0, help="GPUs shared by the learner and the engines")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    print(f"{'model':>12} {'params':>8} {'MB/sync':>8} {'object_store s':>15} {'(tensors) s':>12} {'collective s':>13} "
          f"{'tensors/os':>10} {'os/coll':>8} {'step s':>8} {'sync share (os / coll)':>23}")
    for shape in args.models:
        r = bench(shape, args)
        share = [r[m] / (r[m] + r["step"]) for m in ("object_store", "collective")]
        print(f"{r['model']:>12} {r['params_M']:>7.1f}M {r['MB_per_sync']:>8.0f} {r['object_store']:>15.3f} "
              f"{r['tensors']:>12.3f} {r['collective']:>13.3f} {r['tensors'] / r['object_store']:>9.2f}x "
              f"{r['object_store'] / r['collective']:>7.2f}x {r['step']:>8.3f} {share[0]:>11.0%} / {share[1]:.0%}",
              flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
