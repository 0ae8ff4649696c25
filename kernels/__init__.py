"""Ponder's compute kernels. Each op has a plain-torch reference (the spec the tests hold the
Triton kernels to) and the models call the op through this package, so the implementation can be
swapped without touching the model code.

The name clashes with the Hugging Face `kernels` distribution on PyPI. transformers probes for that
one by name, finds ours, reads the version of the distribution that ships it (`ponder`), and turns
it down as outside the range it supports; tests/test_kernels_package.py holds that line.
"""

from kernels.attention import sliding_window_attention
from kernels.swiglu import swiglu

__all__ = ["sliding_window_attention", "swiglu"]
