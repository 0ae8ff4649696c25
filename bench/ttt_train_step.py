"""Meta-learning cost: one TTT-E2E training step (second and first order, with and without
per-chunk recompute) against a plain sliding-window model of the same size and context.

Prints step time and peak memory, each as a ratio to the plain step, then peak memory against
sequence length with and without recompute. Every variant runs in its own process, so each peak
is its own. The paper reports meta-learning 3.4x slower than plain pretraining at 8K on GPU.

    python bench/ttt_train_step.py                    # CPU, context 1024
    python bench/ttt_train_step.py --seq 8192 --chunk 1024 --window 8192 --hidden 768 --layers 12 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bench.common import (add_model_args, build_model, count_ops, memory_mb, peak_memory_mb, run_isolated,  # noqa: E402
                          timeit)

VARIANTS = {
    "plain swa": dict(mode="swa"),
    "ttt 2nd order": dict(mode="ttt_e2e", ttt_grad="second_order"),
    "ttt 2nd order + recompute": dict(mode="ttt_e2e", ttt_grad="second_order", ttt_recompute=True),
    "ttt 1st order": dict(mode="ttt_e2e", ttt_grad="first_order"),
}


def one(args, variant: str, seq: int) -> dict:
    device = torch.device(args.device)
    model = build_model(args, **VARIANTS[variant])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randint(0, args.vocab, (args.batch, seq + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = memory_mb(device)  # model, optimiser and batch; the step's own peak comes on top
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timeit(step, device, repeats=args.repeats)
    peak = peak_memory_mb(device) - before
    return {"seconds": seconds, "peak_mb": peak, "params": model.num_params(), "ops": count_ops(step)["total"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--memory-seqs", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, default=2)
    add_model_args(p, window=512, chunk=128)
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEQ"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one[0], int(args.one[1]))))
        return

    passthrough = sys.argv[1:]
    results = {}
    jobs = [(v, args.seq) for v in VARIANTS] + [(v, s) for s in args.memory_seqs
                                                 for v in ("ttt 2nd order", "ttt 2nd order + recompute")]
    for variant, seq in tqdm(jobs, desc="variants"):
        if (variant, seq) not in results:
            results[variant, seq] = run_isolated(__file__, passthrough + ["--one", variant, str(seq)])

    base = results["plain swa", args.seq]
    print(f"\none training step ({args.device}; batch {args.batch} x {args.seq} tokens, d={args.hidden}, "
          f"{args.layers} layers, window {args.window}, chunk {args.chunk})")
    print("(peak MB: the step's peak memory above what the model, optimiser state and batch hold; ops: torch ops "
          "that compute plus Triton launches, dispatched per step)")
    print(f"{'variant':>27} | {'step':>9} | {'vs plain':>8} | {'peak MB':>8} | {'vs plain':>8} | {'ops':>6} | {'vs plain':>8}")
    for variant in VARIANTS:
        r = results[variant, args.seq]
        print(f"{variant:>27} | {r['seconds']:8.3f}s | {r['seconds'] / base['seconds']:7.2f}x | "
              f"{r['peak_mb']:8.0f} | {r['peak_mb'] / base['peak_mb']:7.2f}x | {r['ops']:6d} | "
              f"{r['ops'] / base['ops']:7.2f}x")
    print("\npeak memory (MB) against sequence length, TTT-E2E second order")
    print(f"{'seq':>6} | {'keep activations':>16} | {'recompute per chunk':>19}")
    for seq in args.memory_seqs:
        a, b = results["ttt 2nd order", seq], results["ttt 2nd order + recompute", seq]
        print(f"{seq:>6} | {a['peak_mb']:16.0f} | {b['peak_mb']:19.0f}")


if __name__ == "__main__":
    main()
