"""The Triton RMSNorm (kernels/triton_rmsnorm.py) against its torch reference (kernels/rmsnorm.py),
at three orders (tests/kernel_checks.py) and a fourth where the third runs in torch ops. Every buffer
a kernel should fill starts as NaN, so an element it skips fails the test."""

import pytest
import torch

from tests.kernel_checks import DEVICE, assert_close, check_three_orders, leaf, use_device  # noqa: I001  (first: picks the interpreter)

pytest.importorskip("triton", reason="triton is not installed")

import kernels  # noqa: E402
from kernels import triton_rmsnorm, triton_utils  # noqa: E402
from kernels.rmsnorm import rms_norm as rms_norm_reference  # noqa: E402
from kernels.triton_rmsnorm import rms_norm  # noqa: E402

EPS = 1e-6


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_utils, "POISON_OUTPUTS", True)


on_device = pytest.fixture(autouse=True)(use_device)


def norm_of(op, eps=EPS):
    return lambda x, w: op(x, w, eps)


def gain(d, dtype):
    """Around 1, as trained gains are, but not 1 (so the weight's role is checked)."""
    return (1 + 0.5 * torch.randn(d, dtype=dtype)).requires_grad_()


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


@DTYPES
def test_rms_norm_contiguous(dtype):
    torch.manual_seed(0)
    x, w = leaf(2, 7, 24, dtype=dtype), gain(24, dtype)
    check_three_orders("rms_norm [2, 7, 24]", norm_of(rms_norm), norm_of(rms_norm_reference), (x, w), dtype)


@DTYPES
def test_rms_norm_qk_norm_transposed_view(dtype):
    """QK-norm runs on q.view(B, T, H, D).transpose(1, 2): rows read through the strides."""
    torch.manual_seed(1)
    B, T, H, D = 2, 5, 3, 16
    x, w = leaf(B, T, H * D, dtype=dtype), gain(D, dtype)

    def run(op):
        return lambda x, w: op(x.view(B, T, H, D).transpose(1, 2), w, EPS)

    assert not x.view(B, T, H, D).transpose(1, 2).is_contiguous()
    check_three_orders("rms_norm on [B, H, T, D] view", run(rms_norm), run(rms_norm_reference), (x, w), dtype)


@DTYPES
def test_rms_norm_d_not_power_of_two_across_row_blocks(dtype, monkeypatch):
    """d = 40 (a padded tile) and 35 rows in blocks of 4, two backward programs looping over them
    (the GPU's layout, forced here): the last block is partial and some iterations have no rows."""
    monkeypatch.setattr(triton_rmsnorm, "TILE_ELEMENTS", 4 * 64)
    monkeypatch.setattr(triton_rmsnorm, "MAX_PROGRAMS", 2)
    torch.manual_seed(2)
    x, w = leaf(5, 7, 40, dtype=dtype), gain(40, dtype)
    check_three_orders("rms_norm d=40, row blocks", norm_of(rms_norm, 1e-5), norm_of(rms_norm_reference, 1e-5),
                       (x, w), dtype)


def test_rms_norm_third_derivative():
    """The double backward's own backward runs through torch ops; it must still be right."""
    torch.manual_seed(3)
    dtype = torch.float64
    x, w = leaf(3, 4, 24, dtype=dtype), gain(24, dtype)
    c1, c2 = torch.randn(3, 4, 24, dtype=dtype), torch.randn(3, 4, 24, dtype=dtype)

    def third(op):
        gx, gw = torch.autograd.grad((op(x, w, EPS) * c1).sum(), (x, w), create_graph=True)
        (gxx,) = torch.autograd.grad((gx * c2).sum() + gw.sum(), x, create_graph=True)
        return torch.autograd.grad((gxx * gxx).sum(), (x, w))

    for i, (a, b) in enumerate(zip(third(rms_norm), third(rms_norm_reference))):
        assert_close(f"rms_norm [{dtype}] d3/d input{i}", a, b, 1e-11)


def test_rms_norm_dtype_promotion_and_expanded_gradient():
    """float32 x with a float64 gain gives float64 out, normalised in float32 as the reference;
    the gradient of .sum() arrives expanded (every stride 0)."""
    torch.manual_seed(4)
    x, w = leaf(3, 40, dtype=torch.float32), gain(40, torch.float64)
    out, ref = rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS)
    assert out.dtype == ref.dtype == torch.float64
    assert_close("rms_norm f32 x, f64 w out", out, ref, 1e-6)
    grads, grads_ref = torch.autograd.grad(out.sum(), (x, w)), torch.autograd.grad(ref.sum(), (x, w))
    for name, a, b in zip(("x", "w"), grads, grads_ref):
        assert a.dtype == b.dtype
        assert_close(f"rms_norm f32 x, f64 w d/d{name}", a, b, 2e-6)
    check_three_orders("rms_norm f32 x, f64 w", norm_of(rms_norm), norm_of(rms_norm_reference), (x, w),
                       torch.float32)


def test_rms_norm_dispatch():
    torch.manual_seed(5)
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    ref = rms_norm_reference(x, w, EPS)
    assert torch.equal(kernels.rms_norm(x, w, EPS, backend="torch"), ref)
    assert_close("kernels.rms_norm triton", kernels.rms_norm(x, w, EPS, backend="triton"), ref, 1e-6)
    if DEVICE == "cpu":
        assert torch.equal(kernels.rms_norm(x, w, EPS), ref)  # "auto" on CPU: torch
