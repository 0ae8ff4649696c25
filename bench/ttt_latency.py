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
from rollout.graphed_decode import GraphedDecoder  # noqa: E402


@torch.no_grad()
def decode_latency(model, context: int, args, graphed: bool = False) -> float:
    """Seconds per decoded token after a prefill of `context` tokens, averaged over `steps`
    tokens (a multiple of the chunk, so TTT-E2E's updates are included at their real rate).
    graphed: through the torch engine's fixed-buffer decoder (CUDA graphs on a GPU)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, context), generator=gen).to(args.device)
    tokens = torch.randint(0, args.vocab, (1, args.steps), generator=gen).to(args.device)
    state = model.new_state(1)
    model(prompt, state=state)
    decoder = GraphedDecoder(model) if graphed else None

    def run():
        s = state.expand(1)  # a fresh copy each repeat: every run decodes from the same context
        if decoder is not None:
            decoder.start(s, context + args.steps)
        for t in range(args.steps):
            if decoder is not None:
                decoder.step(tokens[:, t])
            else:
                model(tokens[:, t : t + 1], state=s)

    return timeit(run, torch.device(args.device), repeats=args.repeats) / args.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--graphed-only", action="store_true", help="only the fixed-buffer (graphed) decoder")
    add_model_args(p, window=1024, chunk=128)
    args = p.parse_args()

    modes = ("full", "ttt_e2e")
    variants = [(m, g) for m in modes for g in ((True,) if args.graphed_only else (False, True))]
    latency = {v: {} for v in variants}
    with tqdm(total=len(variants) * len(args.contexts), desc="decode latency") as bar:
        for mode in modes:
            model = build_model(args, mode=mode).eval()
            for graphed in sorted({g for m, g in variants}):
                for ctx in args.contexts:
                    latency[mode, graphed][ctx] = decode_latency(model, ctx, args, graphed)
                    bar.update(1)
            del model

    where = "CUDA graphs" if args.device.startswith("cuda") else "run eagerly here"
    print(f"\nper-token decode latency ({args.device}; d={args.hidden}, {args.layers} layers, "
          f"window {args.window}, chunk {args.chunk}; ms/token, and ratio to the {args.contexts[0]} context; "
          f"graphed: the torch engine's fixed-buffer decoder, {where})")
    names = {("full", False): "full attention", ("full", True): "full, graphed", ("ttt_e2e", False): "TTT-E2E",
             ("ttt_e2e", True): "TTT-E2E, graphed"}
    print(f"{'context':>8} | " + " | ".join(f"{names[v]:>22}" for v in variants) + " | full / TTT (graphed)")
    base = {v: latency[v][args.contexts[0]] for v in variants}
    for ctx in args.contexts:
        cells = [f"{latency[v][ctx] * 1e3:10.2f} ms ({latency[v][ctx] / base[v]:5.2f}x)" for v in variants]
        ratio = latency["full", True][ctx] / latency["ttt_e2e", True][ctx]  # graphed runs in every selection
        print(f"{ctx:>8} | " + " | ".join(cells) + f" | {ratio:6.2f}x")


if __name__ == "__main__":
    main()
