"""What every Triton kernel test shares: the device, relative errors, and the three-order check.

Import this module before anything imports Triton. Without a GPU it turns on Triton's interpreter
(kernels run on CPU through NumPy); with one, the kernels compile for it and every test tensor is
made there (`on_device`, an autouse fixture of each kernel test module).

Every op is checked on fresh random inputs at three orders: the output, the first derivatives
(against torch autograd of the reference) and the second derivatives (a random linear function
of the first derivatives, built with create_graph=True, differentiated again). Errors are
relative, rel = ‖out - ref‖ / ‖ref‖, with the tolerance written beside each dtype.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

# Relative-error tolerances (output, first, second derivatives). float32 second derivatives sum
# many products of first-order terms, so they get a wider bound than the outputs.
TOL = {torch.float32: (1e-5, 2e-5, 5e-5), torch.float64: (1e-12, 1e-12, 1e-11)}


def use_device():
    """Make DEVICE torch's default for the duration of a test (a generator for a fixture)."""
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float(out.norm())


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    rel = rel_err(out, ref)
    print(f"{name:<48} rel {rel:.1e}  (tol {tol:.0e})")
    assert rel < tol, f"{name}: relative error {rel:.3e} >= {tol:.0e}"


def check_three_orders(name, fn, ref_fn, inputs, dtype):
    """fn(*inputs) against ref_fn(*inputs): output, gradients, and gradients of gradients."""
    tol_out, tol_d1, tol_d2 = TOL[dtype]
    out, ref = fn(*inputs), ref_fn(*inputs)
    assert_close(f"{name} [{dtype}] out", out, ref, tol_out)

    cot = torch.randn_like(ref)
    d1 = torch.autograd.grad(out, inputs, cot, create_graph=True, materialize_grads=True)
    d1_ref = torch.autograd.grad(ref, inputs, cot, create_graph=True, materialize_grads=True)
    for i, (a, b) in enumerate(zip(d1, d1_ref)):
        assert_close(f"{name} [{dtype}] d/d input{i}", a, b, tol_d1)

    cots = [torch.randn_like(g) for g in d1_ref]
    inner = [(a * c).sum() for a, c in zip(d1, cots) if a.requires_grad]
    inner_ref = [(b * c).sum() for b, c in zip(d1_ref, cots) if b.requires_grad]
    assert len(inner) == len(inner_ref) and inner, "no first derivative depends on the inputs"
    d2 = torch.autograd.grad(sum(inner), inputs, materialize_grads=True)
    d2_ref = torch.autograd.grad(sum(inner_ref), inputs, materialize_grads=True)
    for i, (a, b) in enumerate(zip(d2, d2_ref)):
        assert_close(f"{name} [{dtype}] d2/d input{i}", a, b, tol_d2)


def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()
