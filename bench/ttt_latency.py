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

from bench.common import timeit  # noqa: E402
from models import PonderConfig, PonderForCausalLM  # noqa: E402


def build(mode: str, args) -> PonderForCausalLM:
    torch.manual_seed(0)
    cfg = PonderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, intermediate_size=args.mlp, mode=mode,
                       sliding_window=args.window, mini_batch_size=args.chunk)
    return PonderForCausalLM(cfg).to(args.device).eval()


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
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    modes = ("full", "ttt_e2e")
    latency = {m: {} for m in modes}
    with tqdm(total=len(modes) * len(args.contexts), desc="decode latency") as bar:
        for mode in modes:
            model = build(mode, args)
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
