"""The Triton RoPE kernel (kernels/triton_rope.py) against kernels/rope.py's apply_rope: compiled on
the GPU where there is one, else on CPU through the Triton interpreter (tests/kernel_checks.py).

RoPE is linear in x, so its first derivative does not depend on x and a check of the second
derivative needs a nonlinear function of the output: the checks differentiate rope(x)², whose
orders run the kernel forward, transposed, then forward again.
"""

from tests.kernel_checks import assert_close, check_three_orders, leaf, use_device  # noqa: I001  (first: picks the interpreter)

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kernels import rope as dispatch_rope  # noqa: E402
from kernels import triton_utils  # noqa: E402
from kernels.rope import apply_rope  # noqa: E402
from kernels.triton_rope import RopeFunction, rope  # noqa: E402
from models.model import rope_cos_sin, rope_inv_freq  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_utils, "POISON_OUTPUTS", True)


on_device = pytest.fixture(autouse=True)(use_device)


def random_tables(T, D, dtype):
    """cos, sin with unequal halves, so a backward that only negated sin would fail."""
    return torch.randn(T, D, dtype=dtype), torch.randn(T, D, dtype=dtype)


def squared(op, cos, sin, view=lambda x: x):
    return lambda x: op(view(x), cos, sin).square()


@DTYPES
def test_rope_contiguous(dtype):
    torch.manual_seed(0)
    cos, sin = random_tables(10, 16, dtype)
    x = leaf(2, 3, 10, 16, dtype=dtype)
    check_three_orders("rope contiguous", squared(rope, cos, sin), squared(apply_rope, cos, sin), (x,), dtype)


@DTYPES
def test_rope_transposed_view(dtype):
    """q as Attention makes it: [B, T, H, D] viewed as [B, H, T, D], read without a copy."""
    torch.manual_seed(1)
    cos, sin = random_tables(10, 16, dtype)
    x = leaf(2, 10, 3, 16, dtype=dtype)

    def view(x):
        return x.transpose(1, 2)

    assert not view(x).is_contiguous()
    check_three_orders("rope transposed view", squared(rope, cos, sin, view), squared(apply_rope, cos, sin, view),
                       (x,), dtype)


@DTYPES
def test_rope_tables_at_a_start_position(dtype):
    torch.manual_seed(2)
    cos, sin = rope_cos_sin(torch.arange(37, 37 + 7), rope_inv_freq(12, 10000.0), dtype)
    x = leaf(2, 2, 7, 12, dtype=dtype)
    check_three_orders("rope positions 37..43", squared(rope, cos, sin), squared(apply_rope, cos, sin), (x,), dtype)


def test_rope_third_derivative():
    torch.manual_seed(3)
    dtype = torch.float64
    cos, sin = random_tables(5, 8, dtype)
    x = leaf(2, 5, 8, dtype=dtype)
    cots = [torch.randn_like(x) for _ in range(3)]

    def third(op):
        y = op(x, cos, sin).pow(3)
        (g1,) = torch.autograd.grad(y, x, cots[0], create_graph=True)
        (g2,) = torch.autograd.grad((g1 * cots[1]).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad((g2 * cots[2]).sum(), x)
        return g3

    assert_close("rope third derivative [float64]", third(rope), third(apply_rope), 1e-11)


def test_rope_dtypes_follow_torch_promotion():
    """x in bf16 with float32 tables (bf16 autocast): the output is float32, x's gradient bf16."""
    torch.manual_seed(4)
    cos, sin = rope_cos_sin(torch.arange(6), rope_inv_freq(8, 10000.0), torch.float32)
    x = leaf(3, 6, 8, dtype=torch.bfloat16)
    out, ref = rope(x, cos, sin), apply_rope(x.float(), cos, sin)
    assert out.dtype == apply_rope(x, cos, sin).dtype == torch.float32
    assert_close("rope bf16 x, float32 tables", out, ref, 1e-6)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert dx.dtype == torch.bfloat16


def test_rope_dispatch_and_constant_tables():
    torch.manual_seed(5)
    cos, sin = random_tables(4, 8, torch.float32)
    x = torch.randn(2, 4, 8)
    assert_close("rope dispatch", dispatch_rope(x, cos, sin, backend="triton"),
                 dispatch_rope(x, cos, sin, backend="torch"), 1e-6)
    with pytest.raises(ValueError, match="constants"):
        rope(x, cos.requires_grad_(), sin)
    assert RopeFunction.apply(x, cos.detach(), sin).is_contiguous()
