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


# Dispatched ops that launch no kernel: allocation, aliasing and host reads.
NO_KERNEL_OPS = {"detach", "empty", "new_empty", "empty_like", "empty_strided", "_local_scalar_dense", "set_",
                 "lift_fresh", "alias", "_unsafe_view", "resolve_conj", "resolve_neg"}


def count_ops(fn) -> dict[str, int]:
    """Ops one call of fn() dispatches, on any device: torch ops that compute (views, allocation and
    aliasing left out; counted under autograd, backward included) and Triton kernel launches.
    On a GPU each is at least one kernel launch; on CPU this is the same count, so the figure can
    be checked without one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"torch": 0, "triton": 0}
    inside_triton = [0]  # the interpreter runs a Triton kernel through torch/NumPy: not ops of ours

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside_triton[0] and not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL_OPS:
                counts["torch"] += 1
            return func(*args, **(kwargs or {}))

    patched = []
    for cls in triton_launchers():
        def run(self, *args, _orig=cls.run, **kwargs):
            counts["triton"] += 1
            inside_triton[0] += 1
            try:
                return _orig(self, *args, **kwargs)
            finally:
                inside_triton[0] -= 1
        patched.append((cls, cls.run))
        cls.run = run
    try:
        with Counter():
            fn()
    finally:
        for cls, orig in patched:
            cls.run = orig
    counts["total"] = counts["torch"] + counts["triton"]
    return counts


def triton_launchers() -> list[type]:
    """The classes whose `run` launches a Triton kernel (compiled and interpreted), if Triton is here."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    return [JITFunction, InterpretedFunction]


def gpu_busy(fn) -> dict[str, float]:
    """One call of fn() under torch.profiler: the share of its wall time in which the GPU ran a
    kernel (the union of kernel intervals) and the number of kernels it ran. CUDA only."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("bench_step"):
            fn()
            torch.cuda.synchronize()
    events = prof.events()
    step = next(e for e in events if e.name == "bench_step")
    lo, hi = step.time_range.start, step.time_range.end
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
                     and "memset" not in e.name.lower())
    busy, end = 0.0, lo
    for start, stop in kernels:
        start, stop = max(start, end), min(stop, hi)
        if stop > start:
            busy += stop - start
            end = stop
    return {"busy_share": busy / max(hi - lo, 1e-9), "gpu_kernels": len(kernels), "busy_ms": busy / 1e3,
            "wall_ms": (hi - lo) / 1e3}
