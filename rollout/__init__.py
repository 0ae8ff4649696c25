"""Rollout: generation engines behind one interface (rollout/engine.py) and the built-in torch
engine that runs every Ponder model, TTT-E2E fast weights included."""

from rollout.engine import Engine, Generation, ThoughtGroup
from rollout.torch_engine import TorchEngine

__all__ = ["Engine", "Generation", "ThoughtGroup", "TorchEngine"]
