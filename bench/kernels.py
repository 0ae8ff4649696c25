"""Ponder's Triton kernels against the torch path: the TTT-E2E meta-learning step (second order)
with each, next to a plain sliding-window pretraining step of the same size and context, then
every kernel alone (forward + backward + double backward, as the meta-gradient runs it).

Ratios are to the plain step (time, peak memory above what the model, optimiser and batch hold,
and ops dispatched per step). Every step variant runs in its own process, so one variant's memory
never counts against the next. The goals on an H200 at the 125M shape: a meta-learning step within
2.0x of the plain one at batch 1 and 1.5x at batch 4; the paper reports 3.4x at 8K context with
materialised attention in the suffix. "+ graph": forward and backward replayed from a CUDA graph
(training/cuda_graph.py, train.cuda_graphs=true).

On CUDA the defaults are 8K context, a 125M-shaped model, bf16 autocast. Without CUDA the same
script runs tiny shapes on CPU through the Triton interpreter (TRITON_INTERPRET=1, set here before
Triton is imported): that checks it runs end to end; its timings mean nothing.

    python bench/kernels.py                         # whatever this machine has
    python bench/kernels.py --seq 8192 --window 8192 --chunk 1024 --hidden 768 --layers 12 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402  (torch does not import triton; models, through transformers, does)

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tqdm.auto import tqdm  # noqa: E402

from bench.common import count_ops, gpu_busy, run_isolated, timeit  # noqa: E402
from kernels.attention import sliding_window_attention_reference  # noqa: E402
from kernels.linear_ce import linear_cross_entropy as linear_ce_torch  # noqa: E402
from kernels.swiglu import swiglu as swiglu_torch  # noqa: E402
from models import PonderConfig, PonderForCausalLM  # noqa: E402
from kernels.sgd import clip_by_global_norm  # noqa: E402
from training.cuda_graph import GraphedStep  # noqa: E402

GPU_SHAPES = dict(seq=8192, window=8192, chunk=1024, batch=1, hidden=768, layers=12, heads=12, mlp=2048,
                  vocab=32000, repeats=3)
# The GPU shape's structure (12 layers, 3 in the suffix, 8 chunks, batch 1) at tiny widths: its op counts
# are the GPU step's, checked without a GPU.
CPU_SHAPES = dict(seq=64, window=64, chunk=8, batch=1, hidden=32, layers=12, heads=2, mlp=64, vocab=64, repeats=1)

STEP_VARIANTS = {
    "plain swa (SDPA)": dict(mode="swa", kernels="torch"),
    "ttt-e2e 2nd order, torch": dict(mode="ttt_e2e", kernels="torch"),
    "ttt-e2e 2nd order, triton": dict(mode="ttt_e2e", kernels="triton"),
    "ttt-e2e 2nd order, triton + graph": dict(mode="ttt_e2e", kernels="triton", cuda_graph=True),
    "plain swa (SDPA) + graph": dict(mode="swa", kernels="torch", cuda_graph=True),
}
BASELINE = "plain swa (SDPA)"


def peak_mb(device: torch.device, before: float) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 - before if device.type == "cuda" else None


def reset_peak(device: torch.device) -> float:
    """Clear the peak counter; returns memory in use now (MB), which the peak is measured above."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def graph_mb(fn) -> float:
    """MB of the distinct storages autograd keeps for the backward while fn runs: what a graph
    holds, measurable on any device (on CPU the only memory figure here that means something)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def measure(fn, device, repeats) -> dict:
    """Median seconds and peak MB of fn(); 'OOM' when it does not fit."""
    try:
        fn()  # warm-up (compiles the kernels), outside the peak
        before = reset_peak(device)
        seconds = timeit(fn, device, repeats=repeats, warmup=0)
        return {"seconds": seconds, "peak_mb": peak_mb(device, before)}
    except torch.cuda.OutOfMemoryError:
        return {"seconds": None, "peak_mb": None, "oom": True}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def train_step(args, device, variant: dict) -> dict:
    """One variant's step: time, peak memory, ops dispatched, and on CUDA the GPU's busy share."""
    variant = dict(variant)
    graphed = variant.pop("cuda_graph", False)
    torch.manual_seed(0)
    cfg = PonderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, intermediate_size=args.mlp, sliding_window=args.window,
                       mini_batch_size=args.chunk, max_position_embeddings=max(args.seq, 8192), **variant)
    model = PonderForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    def loss_and_logits(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=not graphed):
            out = model(batch[:, :-1], targets=batch[:, 1:])
        return out.loss, out.logits

    if graphed:
        forward_backward = GraphedStep(loss_and_logits, list(model.parameters()))
    else:
        def forward_backward(batch):
            loss_and_logits(batch)[0].backward()

    def step():
        forward_backward(x)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = measure(step, device, args.repeats)
    if result.get("oom"):
        return result
    result["graph_mb"] = graph_mb(lambda: loss_and_logits(x))
    result["graph_fallback"] = forward_backward.eager_reason if graphed else None

    def eager_step():
        loss_and_logits(x)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result["ops"] = count_ops(eager_step)  # the same ops whether replayed from a graph or not
    if device.type == "cuda":
        result.update(gpu_busy(step))
    return result


def three_orders(fn, inputs):
    """What the meta-gradient asks of an op: forward, backward with create_graph, backward again."""

    def run():
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out), create_graph=True, materialize_grads=True)
        inner = sum(g.float().square().sum() for g in grads if g.requires_grad)
        torch.autograd.grad(inner, inputs, materialize_grads=True)

    return run


def graph_first_backward(fn, inputs) -> float:
    """graph_mb of an op's forward and first backward (create_graph), the inputs left out."""
    inputs_mb = sum(t.untyped_storage().nbytes() for t in inputs) / 2**20

    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out), create_graph=True, materialize_grads=True)

    return max(0.0, graph_mb(run) - inputs_mb)


def op_cases(args, device):
    """(name, torch fn, triton fn, inputs) at the shapes one suffix chunk step of the model has."""
    from kernels.triton_attention import sliding_window_attention as attention_triton
    from kernels.triton_linear_ce import linear_cross_entropy as linear_ce_triton
    from kernels.triton_sgd import clipped_sgd_step
    from kernels.triton_swiglu import swiglu as swiglu_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, b, d, H = args.batch, args.chunk, args.hidden, args.heads
    D, width, keys = d // H, args.mlp, min(args.window, args.seq) + args.chunk

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    qkv = (leaf(B, H, b, D), leaf(B, H, keys, D), leaf(B, H, keys, D))
    mlp = (leaf(B, b, d), leaf(B, width, d, scale=0.05), leaf(B, d, width, scale=0.05), leaf(B, width, d, scale=0.05))
    head = (leaf(B * b, d), leaf(args.vocab, d, scale=0.05))
    targets = torch.randint(0, args.vocab, (B * b,), device=device)
    n_fast = 3 * max(1, args.layers // 4)
    sgd = tuple(leaf(B, width, d) for _ in range(n_fast)) + tuple(leaf(B, width, d, scale=1e-3) for _ in range(n_fast))

    def sgd_torch(*t):
        grads = clip_by_global_norm(list(t[n_fast:]), 1.0)
        return torch.cat([(w - g).flatten() for w, g in zip(t[:n_fast], grads)])

    def sgd_triton(*t):
        return torch.cat([w.flatten() for w in clipped_sgd_step(list(t[:n_fast]), list(t[n_fast:]), 1.0, 1.0)])

    window = args.window
    return [
        (f"swa attention [{B},{H},{b}x{keys},{D}] w={window}",
         lambda q, k, v: sliding_window_attention_reference(q, k, v, window),
         lambda q, k, v: attention_triton(q, k, v, window), qkv),
        (f"fast swiglu [{B},{b},{d}] x [{B},{width},{d}]", swiglu_torch, swiglu_triton, mlp),
        (f"lm head + CE [{B * b},{d}] x [{args.vocab},{d}]",
         lambda h, w: linear_ce_torch(h, w, targets), lambda h, w: linear_ce_triton(h, w, targets), head),
        (f"clip + sgd step, {n_fast} x [{B},{width},{d}]", sgd_torch, sgd_triton, sgd),
    ]


def print_parity(args, device) -> None:
    """The meta-learning step's loss and gradient with Triton kernels against the torch path, in the
    precision the bench trains in (bf16 autocast on CUDA)."""
    runs = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = PonderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=args.mlp, sliding_window=args.window,
                           mini_batch_size=args.chunk, max_position_embeddings=max(args.seq, 8192), mode="ttt_e2e",
                           kernels=kernels)
        model = PonderForCausalLM(cfg).to(device)
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        runs[kernels] = loss.detach().double(), torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        del model
    (loss_r, grad_r), (loss_t, grad_t) = runs["torch"], runs["triton"]
    rel = float((grad_t - grad_r).norm() / grad_r.norm())
    cos = float(grad_t @ grad_r / (grad_t.norm() * grad_r.norm()))
    print(f"\nparity, triton against torch ({'bf16 autocast' if device.type == 'cuda' else 'float32'}): loss rel "
          f"{float((loss_t - loss_r).abs() / loss_r.abs()):.1e}, meta-gradient rel {rel:.1e} (cosine {cos:.5f})")


def fmt(x, spec, unit=""):
    return "-" if x is None else f"{x:{spec}}{unit}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_steps(args, device, where) -> None:
    steps = {}
    names = [BASELINE] + [n for n in (args.variants or STEP_VARIANTS) if n != BASELINE]
    for name in tqdm(names, desc="training steps, each in its own process"):
        steps[name] = run_isolated(__file__, sys.argv[1:] + ["--one", name])
    base = steps[BASELINE]
    print(f"\none training step ({where})")
    print(f"batch {args.batch} x {args.seq} tokens, d={args.hidden}, {args.layers} layers ({max(1, args.layers // 4)} "
          f"suffix), {args.heads} heads, vocab {args.vocab}, window {args.window}, chunk {args.chunk}")
    print("(peak MB: above what model, optimiser state and batch hold, CUDA only; ops: torch ops that compute plus "
          "Triton launches, dispatched per step on any device; GPU kernels and busy: torch.profiler, CUDA only)")
    print(f"{'variant':>34} | {'step':>9} | {'vs plain':>8} | {'peak MB':>8} | {'vs plain':>8} | {'ops':>6} | "
          f"{'vs plain':>8} | {'GPU kernels':>11} | {'busy':>5}")
    for name, r in steps.items():
        if r.get("oom"):
            print(f"{name:>34} | {'OOM':>9} |")
            continue
        ops = r["ops"]["total"]
        busy = r.get("busy_share")
        print(f"{name:>34} | {fmt(r['seconds'], '8.3f', 's')} | {ratio(r['seconds'], base['seconds']):>8} | "
              f"{fmt(r['peak_mb'], '8.0f'):>8} | {ratio(r['peak_mb'], base['peak_mb']):>8} | {ops:>6} | "
              f"{ratio(ops, base['ops']['total']):>8} | {fmt(r.get('gpu_kernels'), 'd'):>11} | "
              f"{fmt(busy and busy * 100, '4.0f', '%'):>5}")
        if r.get("graph_fallback"):
            print(f"{'':>34}   (ran eagerly: {r['graph_fallback']})")
    def vs(a, b):
        if a not in steps or b not in steps:
            return "-"
        ta, tb = steps[a].get("seconds"), steps[b].get("seconds")
        return f"{ta / tb:.2f}x" if ta and tb else "-"

    print(f"meta-learning / plain: {vs('ttt-e2e 2nd order, triton', BASELINE)} eager; "
          f"{vs('ttt-e2e 2nd order, triton + graph', BASELINE)} graphed against plain eager; "
          f"{vs('ttt-e2e 2nd order, triton + graph', 'plain swa (SDPA) + graph')} both graphed "
          f"(goal <= 2.0x at batch 1, <= 1.5x at batch 4; paper 3.4x)")


def print_ops(args, device) -> None:
    print("\nevery kernel alone: forward + backward (create_graph) + backward again, at one suffix chunk's shapes")
    print("(graph MB: what the graph of the first backward keeps for the second, besides the inputs)")
    print(f"{'op':>44} | {'torch':>9} | {'triton':>9} | {'speed-up':>8} | {'torch MB':>8} | {'triton MB':>9} | "
          f"{'torch graph':>11} | {'triton graph':>12}")
    for name, torch_fn, triton_fn, inputs in op_cases(args, device):
        t = measure(three_orders(torch_fn, inputs), device, args.repeats)
        k = measure(three_orders(triton_fn, inputs), device, args.repeats)
        t_graph, k_graph = (graph_first_backward(fn, inputs) for fn in (torch_fn, triton_fn))
        print(f"{name:>44} | {fmt(t['seconds'] and t['seconds'] * 1e3, '7.2f', 'ms'):>9} | "
              f"{fmt(k['seconds'] and k['seconds'] * 1e3, '7.2f', 'ms'):>9} | {ratio(t['seconds'], k['seconds']):>8} | "
              f"{fmt(t['peak_mb'], '8.0f'):>8} | {fmt(k['peak_mb'], '9.0f'):>9} | {t_graph:11.3f} | {k_graph:12.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = GPU_SHAPES if ON_GPU else CPU_SHAPES
    for name, value in defaults.items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--skip-ops", action="store_true", help="leave out the kernels alone")
    p.add_argument("--skip-steps", action="store_true", help="leave out the training steps")
    p.add_argument("--skip-parity", action="store_true", help="leave out the Triton/torch parity")
    p.add_argument("--variants", nargs="+", choices=list(STEP_VARIANTS), help="step variants (default: all; the "
                   "plain one always runs, as the baseline)")
    p.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)  # one step variant, in this process
    args = p.parse_args()
    device = torch.device("cuda" if ON_GPU else "cpu")
    if args.one:
        print(json.dumps(train_step(args, device, STEP_VARIANTS[args.one])))
        return
    where = (f"{torch.cuda.get_device_name()}, bf16 autocast" if ON_GPU
             else "CPU, Triton interpreter: checks that it runs; timings mean nothing")

    if not args.skip_steps:
        print_steps(args, device, where)
    if not args.skip_ops:
        print_ops(args, device)
    if not args.skip_parity:
        print_parity(args, device)


if __name__ == "__main__":
    main()
