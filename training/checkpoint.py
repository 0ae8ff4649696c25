"""Checkpoints under <run dir>/checkpoints/step_<N>/, written atomically: a step directory either
holds a whole checkpoint or does not exist, so a run killed mid-save resumes from the last one."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (anything torch.save takes) as step_<step>; keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as f:
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    steps = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return steps[-1] if steps else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'state.pt'})")
    # Our own files: optimiser and RNG states are not plain tensors.
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
