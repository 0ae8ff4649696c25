"""Which implementation of an op runs: the plain-torch path or the Triton kernels.

`PonderConfig.kernels` names a backend: "torch", "triton", or "auto" (Triton on CUDA when the
package is installed, torch everywhere else). The choice is made per call from the device of the
tensors, so a model built on CPU and moved to a GPU picks the kernels up.

Nothing here imports Triton: the Triton modules (kernels/triton_*.py) are imported the first time
an op resolves to them, so `import kernels` works on a machine without Triton or a GPU. On CPU the
Triton kernels run only under the interpreter, which `TRITON_INTERPRET=1` turns on and which must
be set before Triton is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kernels={backend!r}: must be one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """"torch" or "triton" for tensors on `device`."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernels='triton' needs the triton package")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"kernels='triton' on {device.type} runs only under the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported")
    return backend


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `tensors` runs in: autocast's where autocast is on (as torch's own
    matmuls would), else their promoted dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
