"""Ponder's models as Hugging Face models: `save_pretrained` / `from_pretrained` and the Auto
classes work once this package is imported."""

from transformers import AutoConfig, AutoModelForCausalLM

from models.config import PonderConfig
from models.model import PonderForCausalLM

AutoConfig.register(PonderConfig.model_type, PonderConfig, exist_ok=True)
AutoModelForCausalLM.register(PonderConfig, PonderForCausalLM, exist_ok=True)

__all__ = ["PonderConfig", "PonderForCausalLM"]
