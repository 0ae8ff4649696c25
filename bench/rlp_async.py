"""RLP steps per second, synchronous against asynchronous rollouts, side by side on one base.

Both runs are pipelines/rlp_midtrain.py with the same base, data, seed and steps; only
rollout.asynchronous differs. Synchronous: rollout, then train, then sync. Asynchronous: the next
step's rollouts are sampled while the learner trains. Steps per second are taken over the RLP
loop alone (the per-step phase timings the pipeline logs), so Ray's start-up is left out.

    python bench/rlp_async.py                        # tiny TTT-E2E base, 2 workers, CPU
    python bench/rlp_async.py --steps 40 --windows 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.metrics import read_metrics  # noqa: E402

PHASES = ("timing_s/rollout", "timing_s/train", "timing_s/sync")


def run(out: Path, name: str, base_args: list[str], asynchronous: bool) -> float:
    """Seconds per RLP step (the sum of its phases), mean over the steps after the first."""
    import pipelines.rlp_midtrain as rlp_midtrain

    rlp_midtrain.main([*base_args, f"out_dir={out}", f"run_name={name}", f"rollout.asynchronous={asynchronous}"])
    steps = [r for r in read_metrics(out / name / "metrics.jsonl") if r["step"] > 1 and "timing_s/train" in r]
    return sum(sum(r.get(p, 0.0) for p in PHASES) for r in steps) / len(steps)


def main(args) -> None:
    common = ["model.hidden_size=64", "model.num_hidden_layers=4", "model.num_attention_heads=2",
              "model.intermediate_size=192", f"pretrain.steps={args.base_steps}", "pretrain.eval_every=1000",
              f"train.steps={args.steps}", "train.eval_every=100000", "train.save_every=100000",
              f"rollout.windows_per_step={args.windows}", f"rollout.num_workers={args.workers}",
              "train.task_problems=0", "wandb.mode=disabled", "data.num_docs=2000"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run(out, "base_maker", [*common, "train.steps=2", "optim.warmup_steps=1"], False)  # makes the base once
        base = [*common, f"base={out / 'base_maker' / 'base' / 'model'}", f"data.tokenizer={out / 'base_maker' / 'tokenizer'}"]
        seconds = {mode: run(out, mode, base, mode == "async") for mode in ("sync", "async")}
    print(f"RLP on CPU: {args.workers} rollout workers, {args.windows} windows per step, {args.steps} steps "
          f"(first left out)")
    for mode, s in seconds.items():
        print(f"  {mode:6s} {1 / s:6.3f} steps/s  ({s:.3f} s per step)  x{seconds['sync'] / s:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=30)
    main(p.parse_args())
