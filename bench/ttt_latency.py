"""Per-token decode latency against context length: full attention vs TTT-E2E of the same size.

TTT-E2E attends to a sliding window and keeps the rest of the context in its fast weights, so a
decoded token costs O(window) whatever the context; full attention's cost grows with it.

    python bench/ttt_latency.py                       # CPU: contexts 1K, 4K, 16K
    python bench/ttt_latency.py --contexts 1024 8192 65536 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bench.common import add_model_args, build_model, timeit  # noqa: E402


@torch.no_grad()
def decode_latency(model, context: int, args) -> float:
    """Seconds per decoded token after a prefill of `context` tokens, averaged over `steps`
    tokens (a multiple of the chunk, so TTT-E2E's updates are included at their real rate)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, context), generator=gen).to(args.device)
    tokens = torch.randint(0, args.vocab, (1, args.steps), generator=gen).to(args.device)
    state = model.new_state(1)
    model(prompt, state=state)

    def run():
        s = state.expand(1)  # a fresh copy each repeat: every run decodes from the same context
        for t in range(args.steps):
            model(tokens[:, t : t + 1], state=s)

    return timeit(run, torch.device(args.device), repeats=args.repeats) / args.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=128)
    add_model_args(p, window=1024, chunk=128)
    args = p.parse_args()

    modes = ("full", "ttt_e2e")
    latency = {m: {} for m in modes}
    with tqdm(total=len(modes) * len(args.contexts), desc="decode latency") as bar:
        for mode in modes:
            model = build_model(args, mode=mode).eval()
            for ctx in args.contexts:
                latency[mode][ctx] = decode_latency(model, ctx, args)
                bar.update(1)

    print(f"\nper-token decode latency ({args.device}; d={args.hidden}, {args.layers} layers, "
          f"window {args.window}, chunk {args.chunk}; ms/token, and ratio to the {args.contexts[0]} context)")
    print(f"{'context':>8} | {'full attention':>22} | {'TTT-E2E':>22} | full / TTT")
    base = {m: latency[m][args.contexts[0]] for m in modes}
    for ctx in args.contexts:
        f, t = latency["full"][ctx], latency["ttt_e2e"][ctx]
        print(f"{ctx:>8} | {f * 1e3:10.2f} ms ({f / base['full']:5.2f}x) | {t * 1e3:10.2f} ms ({t / base['ttt_e2e']:5.2f}x) | {f / t:6.2f}x")


if __name__ == "__main__":
    main()
