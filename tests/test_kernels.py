"""Ponder's Triton kernels against their torch references: compiled on the GPU where there is one,
else on CPU through the Triton interpreter (tests/kernel_checks.py says how each op is checked).

Every buffer a kernel should fill starts as NaN, so an element it skips fails the test. Shapes are
small and tiles big (the interpreter's cost is programs × loop iterations), except where a test
sets small tiles to cross tile edges on purpose. `pytest -s` prints every measured error.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.kernel_checks import DEVICE, assert_close, check_three_orders, leaf, use_device  # noqa: I001  (first: picks the interpreter)

pytest.importorskip("triton", reason="triton is not installed")

from kernels import backend, resolve_backend  # noqa: E402
from kernels import triton_sgd, triton_utils  # noqa: E402
from kernels.attention import sliding_window_attention_reference  # noqa: E402
from kernels.linear_ce import linear_cross_entropy as linear_ce_reference  # noqa: E402
from kernels.swiglu import swiglu as swiglu_reference  # noqa: E402
from kernels.triton_attention import sliding_window_attention  # noqa: E402
from kernels.triton_linear_ce import linear_cross_entropy  # noqa: E402
from kernels.triton_sgd import clipped_sgd_step  # noqa: E402
from kernels.triton_swiglu import swiglu  # noqa: E402
from models import PonderConfig, PonderForCausalLM  # noqa: E402
from kernels.sgd import clip_by_global_norm  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_utils, "POISON_OUTPUTS", True)


on_device = pytest.fixture(autouse=True)(use_device)


# ----------------------------------------------------------------------------- SwiGLU


def fast_weights(B, d, inner, dtype, shared):
    shapes = [(inner, d), (d, inner), (inner, d)]
    return [leaf(*s, dtype=dtype, scale=0.3) if shared else leaf(B, *s, dtype=dtype, scale=0.3) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_swiglu_per_sequence_weights(dtype):
    torch.manual_seed(1)
    x, (w1, w2, w3) = leaf(2, 10, 24, dtype=dtype), fast_weights(2, 24, 40, dtype, shared=False)
    check_three_orders("swiglu per-sequence", swiglu, swiglu_reference, (x, w1, w2, w3), dtype)


@pytest.mark.parametrize("weights", ["shared [I, d]", "broadcast W_0 [B, I, d]"])
def test_swiglu_shared_weights(weights):
    torch.manual_seed(2)
    dtype = torch.float32
    x, ws = leaf(2, 10, 24, dtype=dtype), fast_weights(2, 24, 40, dtype, shared=True)

    def run(op):
        if weights.startswith("shared"):
            return op
        return lambda x, *ws: op(x, *(w.unsqueeze(0).expand(2, *w.shape) for w in ws))

    check_three_orders(f"swiglu {weights}", run(swiglu), run(swiglu_reference), (x, *ws), dtype)


def test_swiglu_third_derivative():
    """The gate's third derivative runs through torch ops; it must still be right."""
    torch.manual_seed(3)
    dtype = torch.float64
    x, (w1, w2, w3) = leaf(2, 6, 16, dtype=dtype), fast_weights(2, 16, 24, dtype, shared=False)
    c1, c2 = torch.randn(2, 6, 16, dtype=dtype), torch.randn(2, 6, 16, dtype=dtype)

    def third(op):
        (gx,) = torch.autograd.grad((op(x, w1, w2, w3) * c1).sum(), x, create_graph=True)
        (gxx,) = torch.autograd.grad((gx * c2).sum(), x, create_graph=True)
        return torch.autograd.grad((gxx * gxx).sum(), (x, w1))

    for i, (a, b) in enumerate(zip(third(swiglu), third(swiglu_reference))):
        assert_close(f"swiglu [{dtype}] d3/d input{i}", a, b, 1e-11)


# ----------------------------------------------------------------------------- clipped SGD step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_clipped_sgd_step(dtype):
    """Rows whose joint norm is above, and below, the clip; W_0 broadcast, later weights per sequence."""
    torch.manual_seed(4)
    B, lr, max_norm = 3, 0.7, 1.0
    row_scale = torch.tensor([0.02, 1.0, 3.0], dtype=dtype).view(B, 1, 1)  # norms ~0.3, ~14, ~40
    w0, w1 = leaf(5, 7, dtype=dtype), leaf(B, 7, 9, dtype=dtype)
    g0 = (torch.randn(B, 5, 7, dtype=dtype) * row_scale).requires_grad_()
    g1 = (torch.randn(B, 7, 9, dtype=dtype) * row_scale).requires_grad_()

    def triton_step(w0, w1, g0, g1):
        return torch.cat([t.flatten(1) for t in clipped_sgd_step([w0.expand(B, 5, 7), w1], [g0, g1], lr, max_norm)], 1)

    def torch_step(w0, w1, g0, g1):
        grads = clip_by_global_norm([g0, g1], max_norm)
        return torch.cat([(w - lr * g).flatten(1) for w, g in zip([w0.expand(B, 5, 7), w1], grads)], 1)

    check_three_orders("clip + sgd update", triton_step, torch_step, (w0, w1, g0, g1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_clipped_sgd_step_many_tensors(dtype, monkeypatch):
    """Four tensors of different sizes in one launch each way, over several 16-element blocks each:
    W_0 broadcast, later weights per sequence; row 0 under the clip, row 1's gradient all zero
    (sq = 0: scale 1, finite derivatives), row 2 clipped."""
    monkeypatch.setattr(triton_sgd, "BLOCK", 16)
    torch.manual_seed(5)
    B, lr, max_norm = 3, 0.7, 1.0
    shapes = [(6, 5), (7, 9), (11,), (3, 4, 5)]
    row_scale = torch.tensor([0.02, 0.0, 3.0], dtype=dtype)
    w0 = leaf(*shapes[0], dtype=dtype)
    ws = [leaf(B, *s, dtype=dtype) for s in shapes[1:]]
    gs = [(torch.randn(B, *s, dtype=dtype) * row_scale.view(B, *[1] * len(s))).requires_grad_() for s in shapes]

    def weights(w0, ws):
        return [w0.expand(B, *shapes[0]), *ws]

    def triton_step(w0, *t):
        ws, gs = t[:3], t[3:]
        return torch.cat([u.flatten(1) for u in clipped_sgd_step(weights(w0, ws), list(gs), lr, max_norm)], 1)

    def torch_step(w0, *t):
        ws, gs = t[:3], t[3:]
        clipped = clip_by_global_norm(list(gs), max_norm)
        return torch.cat([(w - lr * g).flatten(1) for w, g in zip(weights(w0, ws), clipped)], 1)

    check_three_orders("clip + sgd update, 4 tensors", triton_step, torch_step, (w0, *ws, *gs), dtype)


def count_launches(monkeypatch):
    """A list that gets one entry per Triton kernel launch from now on."""
    import triton

    if backend.interpreting():
        cls = triton.runtime.interpreter.InterpretedFunction
    else:
        cls = triton.runtime.jit.JITFunction
    launches, run = [], cls.run

    def counted(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            launches.append(self.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", counted)
    return launches


def test_clipped_sgd_step_reads_a_tensor_learning_rate():
    """The inner lr may be a device tensor (the trainer's, under CUDA graphs, changes between
    replays): the step reads its value, the same as given as a number."""
    torch.manual_seed(11)
    ws = [leaf(3, 5, 7, dtype=torch.float32), leaf(3, 9, dtype=torch.float32)]
    gs = [torch.randn(3, 5, 7), torch.randn(3, 9) * 0.01]
    lr = torch.tensor(0.3)
    for value in (0.3, 0.8):
        lr.fill_(value)
        for a, b in zip(clipped_sgd_step(ws, gs, lr, 1.0), clipped_sgd_step(ws, gs, value, 1.0)):
            assert_close(f"clip + sgd, lr {value} as a tensor", a, b, 1e-7)


def test_clipped_sgd_step_launches(monkeypatch):
    """Nine tensors (3 layers x w1, w2, w3): two launches forward, at most three for a backward."""
    torch.manual_seed(6)
    B, shapes = 2, [(8, 4), (4, 8), (8, 4)] * 3
    ws = [leaf(B, *s, dtype=torch.float32) for s in shapes]
    gs = [leaf(B, *s, dtype=torch.float32) for s in shapes]
    launches = count_launches(monkeypatch)
    new = clipped_sgd_step(ws, gs, 0.5, 1.0)
    assert len(launches) == 2, launches
    forward = len(launches)
    torch.autograd.grad(sum((u * u).sum() for u in new), ws + gs)
    assert len(launches) - forward <= 3, launches[forward:]


# ----------------------------------------------------------------------------- attention

ATTENTION_CASES = {
    # name: (B, H, Tq, Tk, D, window, (BLOCK_M, BLOCK_N) or None for the default tiles)
    "causal, one tile": (2, 2, 20, 20, 16, None, None),
    "window 7 across 16-tiles": (1, 2, 40, 40, 16, 7, (16, 16)),
    "cached keys: Tq 24 of Tk 50, window 13": (2, 1, 24, 50, 16, 13, (16, 16)),
    "window past the keys = causal": (1, 1, 30, 30, 16, 64, (16, 16)),
    "head dim 24, window 2, 16x32 tiles": (1, 1, 33, 33, 24, 2, (16, 32)),
}


@pytest.mark.parametrize("dtype,case", [pytest.param(torch.float32, c, id=f"float32-{c}") for c in ATTENTION_CASES]
                         + [pytest.param(torch.float64, c, id=f"float64-{c}") for c in list(ATTENTION_CASES)[1:3]])
def test_sliding_window_attention(dtype, case):
    B, H, Tq, Tk, D, window, blocks = ATTENTION_CASES[case]
    torch.manual_seed(5)
    q, k, v = leaf(B, H, Tq, D, dtype=dtype), leaf(B, H, Tk, D, dtype=dtype), leaf(B, H, Tk, D, dtype=dtype)
    check_three_orders(
        f"attention {case}",
        lambda q, k, v: sliding_window_attention(q, k, v, window, blocks=blocks),
        lambda q, k, v: sliding_window_attention_reference(q, k, v, window),
        (q, k, v), dtype,
    )


def test_attention_transposed_inputs_match():
    """The model hands over q, k, v as transposed views [B, T, H, D] -> [B, H, T, D]."""
    torch.manual_seed(6)
    x = torch.randn(2, 12, 2, 16)
    q = k = v = x.transpose(1, 2)
    assert_close("attention on strided views", sliding_window_attention(q, k, v, 5),
                 sliding_window_attention_reference(q, k, v, 5), 1e-5)


def largest_saved_tensor(fn) -> int:
    """Elements of the largest tensor autograd keeps for the backward while fn runs."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_attention_graph_keeps_no_score_matrix():
    """Through the first backward with create_graph (what the inner loop builds), the graph keeps
    tensors of q's size at most; the materialised reference keeps [Tq, Tk] scores."""
    torch.manual_seed(9)
    B, H, T, D, window = 1, 2, 64, 16, 8
    q, k, v = (leaf(B, H, T, D, dtype=torch.float32) for _ in range(3))

    def first_backward(op):
        return lambda: torch.autograd.grad(op(q, k, v, window).sum(), (q, k, v), create_graph=True)

    assert largest_saved_tensor(first_backward(sliding_window_attention)) <= B * H * T * D
    assert largest_saved_tensor(first_backward(sliding_window_attention_reference)) >= B * H * T * T


def test_linear_cross_entropy_graph_keeps_no_logits():
    torch.manual_seed(10)
    N, d, V = 32, 16, 100
    h, w, targets = leaf(N, d, dtype=torch.float32), leaf(V, d, dtype=torch.float32), torch.randint(0, V, (N,))

    def first_backward(op):
        return lambda: torch.autograd.grad(op(h, w, targets).sum(), (h, w), create_graph=True)

    assert largest_saved_tensor(first_backward(lambda h, w, t: linear_cross_entropy(h, w, t, 8))) < N * V
    assert largest_saved_tensor(first_backward(linear_ce_reference)) >= N * V


# ----------------------------------------------------------------------------- LM head + CE

CE_CASES = {"one chunk": (12, 16, 61, None), "chunks of 7 rows": (30, 24, 100, 7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_linear_cross_entropy(dtype, case):
    N, d, V, chunk_rows = CE_CASES[case]
    torch.manual_seed(7)
    h, w = leaf(N, d, dtype=dtype), leaf(V, d, dtype=dtype)
    g = torch.rand(N, dtype=dtype).requires_grad_()  # per-row weights: the derivatives reach them too
    targets = torch.randint(0, V, (N,))
    targets[::4] = -100
    check_three_orders(
        f"linear CE {case}",
        lambda h, w, g: linear_cross_entropy(h, w, targets, chunk_rows) * g,
        lambda h, w, g: linear_ce_reference(h, w, targets).to(dtype) * g,
        (h, w, g), dtype,
    )


# ----------------------------------------------------------------------------- wiring


# Llama's shape as models/convert.py makes it: pre-norm only (an output norm on the fast MLP),
# grouped-query attention, an untied head, no QK-norm.
LLAMA_SHAPE = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, post_norm=False,
                   fast_post_norm=True, qk_norm=False)


def tiny_ttt(kernels, dtype=torch.float32, **shape):
    torch.manual_seed(0)
    shape = {"num_attention_heads": 2, **shape}
    cfg = PonderConfig(vocab_size=61, hidden_size=32, num_hidden_layers=4, intermediate_size=64,
                       mode="ttt_e2e", sliding_window=6, mini_batch_size=4, suffix_len=2, kernels=kernels, **shape)
    model = PonderForCausalLM(cfg).to(dtype)
    model.inner_lr = 0.5
    return model


CMS_LEVELS = dict(cms_chunk_sizes=[4, 8], cms_inner_lrs=[0.5, 0.8])  # a slow level that steps at 8


@pytest.mark.parametrize("shape", [{}, LLAMA_SHAPE, CMS_LEVELS], ids=["ttt_e2e", "llama_shape", "cms"])
def test_ttt_model_triton_matches_torch_with_meta_gradient(shape):
    """Loss, logits and the second-order meta-gradient of every parameter (the untied head's
    included): kernels triton vs torch."""
    torch.manual_seed(8)
    x = torch.randint(0, 61, (2, 13))  # chunks of 4: three inner updates, the window cut at 6
    y = torch.cat([x[:, 1:], torch.randint(0, 61, (2, 1))], 1)
    y[0, 5] = -100
    runs = {}
    for kernels in ("torch", "triton"):
        model = tiny_ttt(kernels, **shape)
        out = model(x, targets=y)
        out.loss.backward()
        runs[kernels] = out, {n: p.grad for n, p in model.named_parameters()}
    (out_t, grads_t), (out_r, grads_r) = runs["triton"], runs["torch"]
    assert_close("ttt model loss", out_t.loss, out_r.loss, 1e-6)
    assert_close("ttt model logits", out_t.logits, out_r.logits, 1e-5)
    assert all(g is not None for g in grads_r.values())
    flat_t = torch.cat([grads_t[n].flatten() for n in grads_r])
    flat_r = torch.cat([g.flatten() for g in grads_r.values()])
    assert_close("ttt meta-gradient, all parameters", flat_t, flat_r, 1e-5)
    for name in ("blocks.3.fast_mlp.f.w1.weight", "blocks.2.fast_mlp.f.w2.weight", "blocks.0.attn.f.wq.weight",
                 "embed.weight"):
        assert_close(f"ttt meta-gradient {name}", grads_t[name], grads_r[name], 1e-4)


def test_kernels_setting_is_validated_and_resolved():
    with pytest.raises(ValueError, match="kernels"):
        PonderConfig(kernels="cuda")
    assert PonderConfig().kernels == "auto"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    if DEVICE == "cpu":  # the interpreter is on in this module
        assert resolve_backend("triton", "cpu") == "triton" and backend.interpreting()
    else:
        assert resolve_backend("auto", DEVICE) == "triton" and not backend.interpreting()


def test_default_cpu_path_loads_no_triton_kernel():
    """`import kernels` imports no Triton, and a TTT-E2E model on CPU with the default setting runs
    the torch path without loading any Triton kernel module (so nothing can launch)."""
    code = """
import sys
import kernels
assert "triton" not in sys.modules, "import kernels imported triton"
import torch, models
m = models.PonderForCausalLM(models.PonderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4,
    num_attention_heads=2, intermediate_size=48, mode="ttt_e2e", mini_batch_size=4, sliding_window=8))
x = torch.randint(0, 50, (1, 9))
m(x, targets=x).loss.backward()
loaded = sorted(n for n in sys.modules if n.startswith("kernels.triton"))
assert not loaded, loaded
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
