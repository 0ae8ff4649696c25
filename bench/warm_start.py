"""Warm start vs from scratch at equal data tokens (methods.md §7), on the embedded corpus, through
the real pipelines: pretrain a plain Llama-shaped transformer (full attention, pre-norm only) on
(1 - f) of the budget, export it as a LlamaForCausalLM, convert it (pipelines/convert_hf.py),
bridge it on f of the budget (ttt_pretrain base=...); against TTT-E2E meta-learned from scratch on
the whole budget. Prints held-out bits per byte (inner loop running) side by side.

    python bench/warm_start.py                       # tiny models, CPU
    python bench/warm_start.py --tokens 800000 --bridge-fraction 0.25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipelines.convert_hf as convert_hf  # noqa: E402
import pipelines.ttt_pretrain as ttt_pretrain  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/warm_start")
    p.add_argument("--tokens", type=int, default=400_000, help="data tokens of each arm")
    p.add_argument("--bridge-fraction", type=float, default=0.25)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining, from scratch and the plain base")
    p.add_argument("--bridge-lr", type=float, default=1e-3)
    p.add_argument("--num-docs", type=int, default=20000)
    args = p.parse_args()
    out = Path(args.out).resolve()
    bridge_tokens = int(args.tokens * args.bridge_fraction)
    common = [f"out_dir={out}", "wandb.mode=disabled", f"data.num_docs={args.num_docs}", "train.eval_every=1000000"]
    ttt = [f"model.sliding_window={args.window}", f"model.mini_batch_size={args.chunk}"]

    plain = ttt_pretrain.main([*common, "run_name=plain", "model.mode=full", "model.post_norm=false", "model.qk_norm=false",
                               f"train.data_tokens={args.tokens - bridge_tokens}", f"optim.lr={args.lr}"])
    tokenizer = out / "plain" / "tokenizer"
    converted = convert_hf.convert_plain_run(out / "plain", tokenizer, ttt)
    warm = ttt_pretrain.main([*common, "run_name=warm", f"base={converted}", f"train.data_tokens={bridge_tokens}",
                              f"optim.lr={args.bridge_lr}", f"optim.end_lr={args.bridge_lr / 10}", "optim.warmup_steps=3"])
    scratch = ttt_pretrain.main([*common, "run_name=scratch", "model.mode=ttt_e2e", *ttt, f"data.tokenizer={tokenizer}",
                                 f"train.data_tokens={args.tokens}", f"optim.lr={args.lr}"])

    print(f"\nheld-out bpb at {args.tokens:,} data tokens each (window {args.window}, chunk {args.chunk}):")
    print(f"  plain full attention, {args.tokens - bridge_tokens:,} tokens   {plain['eval/bpb']:.4f}")
    print(f"  converted to TTT-E2E, before the bridge   {warm['bpb_start']:.4f}")
    print(f"  warm start: + bridge of {bridge_tokens:,} tokens  {warm['eval/bpb']:.4f}")
    print(f"  TTT-E2E from scratch                      {scratch['eval/bpb']:.4f}")


if __name__ == "__main__":
    main()
