"""A learner checkpoint written synchronously against asynchronously (learner.async_save): how
long the learner is held by a save, side by side, for the state the learner saves (policy, EMA and
AdamW moments) of a model shape. The asynchronous save holds it only while the state is copied
to host memory; the thread's write runs on while the next steps do.

    python bench/checkpoint_save.py                    # the 125m shape, 3 saves each, CPU
    python bench/checkpoint_save.py --model tiny --saves 5
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.weight_sync import build  # noqa: E402
from training.distributed import ShardedSaver, sharded_state  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="125m", help="a shape in configs/model/")
    p.add_argument("--saves", type=int, default=3)
    args = p.parse_args()

    model = build(args.model)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for q in model.parameters():  # the moments exist after a first step
        q.grad = torch.zeros_like(q)
    optimizer.step()
    state = sharded_state(model, ema, optimizer)
    n = sum(q.numel() for q in model.parameters())
    print(f"{args.model}: {n / 1e6:.1f}M parameters; a checkpoint holds {4 * n * 4 / 2**30:.2f} GiB "
          "(policy, EMA, two AdamW moments, float32)")
    held = {}
    for asynchronous in (False, True):
        saver = ShardedSaver(asynchronous)
        hold, rest = [], []
        with tempfile.TemporaryDirectory() as out:
            for step in range(args.saves + 1):  # the first one warms up
                start = time.perf_counter()
                saver.save(out, step, {"version": step}, state)
                hold.append(time.perf_counter() - start)
                start = time.perf_counter()
                saver.wait()  # in a run, the next steps go on meanwhile
                rest.append(time.perf_counter() - start)
        name = "async" if asynchronous else "sync"
        held[name] = sum(hold[1:]) / args.saves
        print(f"{name:>5}: the learner is held {held[name]:.2f} s per save; the write ends "
              f"{sum(rest[1:]) / args.saves:.2f} s after that")
    print(f"held by a save, async / sync: {held['async'] / held['sync']:.2f}")


if __name__ == "__main__":
    main()
