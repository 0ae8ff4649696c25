"""Ponder's top-level `kernels` package shares its name with Hugging Face's `kernels` on PyPI;
transformers must not take ours for theirs."""

import subprocess
import sys

from tests.conftest import ROOT


def test_transformers_does_not_take_our_kernels_for_the_hub_package(tmp_path):
    # A fresh interpreter with our checkout first on the path, as in a Ray working_dir.
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import kernels
assert kernels.__file__.startswith({str(ROOT)!r}), kernels.__file__
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available(), "transformers believes the hub `kernels` package is installed"
import torch, models
from transformers import AutoModelForCausalLM
m = models.PonderForCausalLM(models.PonderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=48))
m.save_pretrained({str(tmp_path)!r})
m2 = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
print(m2(torch.tensor([[1, 2, 3]])).logits.shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3, 50])" in out.stdout
