"""Shared bits of the benchmarks: timing and peak memory, measured the same way for every variant."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from models import PonderConfig, PonderForCausalLM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def memory_mb(device: torch.device) -> float:
    """Memory in use now: GPU memory allocated, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**10


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set (run each variant in
    its own process so the figure is its own)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def run_isolated(script: str, args: list[str]) -> dict:
    """Run `script --one ...` in a fresh interpreter and return the JSON it prints last."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_model_args(p, window: int, chunk: int) -> None:
    """The model shape and device flags every benchmark takes."""
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--window", type=int, default=window)
    p.add_argument("--chunk", type=int, default=chunk)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_model(args, **config) -> PonderForCausalLM:
    """A seeded model of the shape the flags give; `config` adds PonderConfig keys (mode, ...)."""
    torch.manual_seed(0)
    cfg = PonderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, intermediate_size=args.mlp, sliding_window=args.window,
                       mini_batch_size=args.chunk, **config)
    return PonderForCausalLM(cfg).to(args.device)
