"""Ponder's compute kernels. Each op has a plain-torch reference (the spec the tests hold the
Triton kernels to) and the models call the op through this package, so the implementation can be
swapped without touching the model code.

    torch path (the reference)             Triton path (kernels/triton_*.py)
    swiglu.swiglu                          triton_swiglu.swiglu        (its GEMMs: torch.bmm)
    attention.sliding_window_attention*    triton_attention.sliding_window_attention
    sgd.clipped_sgd_step                   triton_sgd.clipped_sgd_step
    linear_ce.linear_cross_entropy         triton_linear_ce.linear_cross_entropy
    rope.apply_rope                        triton_rope.rope
    rmsnorm.rms_norm                       triton_rmsnorm.rms_norm

(*the materialised `sliding_window_attention_reference` where gradients of gradients are needed.)
The functions below take a `backend` ("auto", "torch", "triton"; see kernels/backend.py) and pick
one path per call. The Triton modules are imported only then, so `import kernels` neither imports
Triton nor launches anything.

The name clashes with the Hugging Face `kernels` distribution on PyPI. transformers probes for that
one by name, finds ours, reads the version of the distribution that ships it (`ponder`), and turns
it down as outside the range it supports; tests/test_kernels_package.py holds that line.
"""

import torch

from kernels.attention import sliding_window_attention, sliding_window_attention_reference
from kernels.backend import BACKENDS, check_backend, resolve_backend, triton_available
from kernels.rmsnorm import rms_norm as rms_norm_reference
from kernels.rope import apply_rope  # loaded here, so `kernels.rope` stays the function below
from kernels.sgd import clip_scale
from kernels.swiglu import swiglu

__all__ = [
    "BACKENDS", "check_backend", "resolve_backend", "triton_available",
    "sliding_window_attention", "swiglu",
    "twice_differentiable_attention", "fast_swiglu", "clipped_sgd", "clip_scale", "linear_cross_entropy",
    "rope", "rms_norm",
]


def twice_differentiable_attention(q, k, v, window=None, scale=None, backend: str = "auto"):
    """Sliding-window attention whose backward is differentiable (TTT-E2E's suffix)."""
    if resolve_backend(backend, q.device) == "triton":
        from kernels.triton_attention import sliding_window_attention as triton_attention

        return triton_attention(q, k, v, window, scale)
    return sliding_window_attention_reference(q, k, v, window, scale)


def fast_swiglu(x, w1, w2, w3, backend: str = "auto"):
    """SwiGLU with shared or per-sequence (fast) weights, differentiable to any order. The Triton
    path serves differentiation (fewer saved tensors, fused gate derivatives); with gradients off
    (decoding) the plain composition runs on the vendor's matmuls."""
    if resolve_backend(backend, x.device) == "triton" and torch.is_grad_enabled():
        from kernels.triton_swiglu import swiglu as triton_swiglu

        return triton_swiglu(x, w1, w2, w3)
    return swiglu(x, w1, w2, w3)


def clipped_sgd(weights, grads, lr, max_norm: float, backend: str = "auto"):
    """w - lr · clip_{global norm ≤ max_norm}(g), the norm joint over all of `weights`, per sequence
    (TTT-E2E's inner step; fused norms and update on the Triton path)."""
    if resolve_backend(backend, grads[0].device) == "triton":
        from kernels.triton_sgd import clipped_sgd_step as triton_step

        return triton_step(weights, grads, lr, max_norm)
    from kernels.sgd import clipped_sgd_step

    return clipped_sgd_step(weights, grads, lr, max_norm)


def linear_cross_entropy(hidden, weight, targets, backend: str = "auto"):
    """Per-token CE of the linear head hidden @ weightᵀ ([..., d] -> [...]); 0 where target is -100."""
    if resolve_backend(backend, hidden.device) == "triton":
        from kernels.triton_linear_ce import linear_cross_entropy as triton_ce

        return triton_ce(hidden, weight, targets)
    from kernels.linear_ce import linear_cross_entropy as torch_ce

    return torch_ce(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1)).view(targets.shape)


def rope(x, cos, sin, backend: str = "auto"):
    """Rotary position embedding of x [..., T, D] by cos, sin [T, D] (constants), differentiable to
    any order in x."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels.triton_rope import rope as triton_rope

        return triton_rope(x, cos, sin)
    return apply_rope(x, cos, sin)


def rms_norm(x, weight, eps: float, backend: str = "auto"):
    """RMSNorm of x [..., d] with gain weight [d] (kernels/rmsnorm.py), differentiable to any order."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels.triton_rmsnorm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
