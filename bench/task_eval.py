"""The evaluation with reasoning (training/evaluate.TaskAccuracy: answers with and without a greedy
thought) with the torch engine's batched generate, against the same engine fed one problem at a
time, side by side on the same model and problems. Both give the same metrics; the ratio is the
speed-up of every evaluation in compare.py.

    python bench/task_eval.py                     # tiny TTT-E2E model, 256 problems, thoughts of up to 40 tokens
    python bench/task_eval.py --mode full --problems 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rollout.torch_engine import TorchEngine  # noqa: E402
from training.config import DataConfig, ModelConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.evaluate import TaskAccuracy  # noqa: E402
from training.run import build_model  # noqa: E402


def one_at_a_time(generate):
    """engine.generate as a loop over its prompts: the unbatched baseline."""
    def loop(self, prompts, *args, **kwargs):
        return [generate(self, [p], *args, **kwargs)[0] for p in prompts]
    return loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="ttt_e2e", choices=["full", "swa", "ttt_e2e"])
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--think-tokens", type=int, default=40)
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(DataConfig(num_docs=6000, tasks=["worked_arithmetic"], cache_dir=f"{tmp}/cache"), tmp, 0)
    model = build_model(ModelConfig(mode=args.mode), data.tokenizer)
    task_eval = TaskAccuracy(data.tokenizer, data.heldout_docs, args.problems, think_tokens=args.think_tokens)

    results = {}
    for name in ("one problem at a time", "batched"):
        batched = TorchEngine.generate
        if name != "batched":
            TorchEngine.generate = one_at_a_time(batched)
        start = time.perf_counter()
        results[name] = (task_eval(model), time.perf_counter() - start)
        TorchEngine.generate = batched
    (slow, t_slow), (fast, t_fast) = results.values()
    print(f"{len(task_eval.rows)} problems, {args.mode}, thoughts up to {args.think_tokens} tokens, "
          f"{torch.get_num_threads()} thread(s):")
    print(f"  one problem at a time  {t_slow:7.1f} s")
    print(f"  batched by length      {t_fast:7.1f} s   ({t_slow / t_fast:.1f}x)")
    same = all(abs(slow[k] - fast[k]) < 1e-4 for k in fast if isinstance(fast[k], float))
    print(f"  metrics equal: {same} (answer NLL after a thought {slow['eval/answer_nll_think']:.4f} vs "
          f"{fast['eval/answer_nll_think']:.4f})")


if __name__ == "__main__":
    main()
