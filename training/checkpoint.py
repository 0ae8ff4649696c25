"""Checkpoints under <run dir>/checkpoints/step_<N>/ and model directories (save_pretrained),
both written atomically: into a temporary directory beside the final one, then renamed, so a
directory either holds a whole checkpoint or does not exist. Loading checks what it reads: a
truncated newest checkpoint is named in a warning and the one before it is used."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
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


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final, moving an existing final aside first (rename cannot replace a
    non-empty directory); a kill in between leaves <final>.old, which load_model_dir restores."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class StorageError(RuntimeError):
    """Writing a checkpoint or model failed; the message names the path and the cause in one line."""


@contextmanager
def writing(path: str | Path):
    """Any failure while writing under `path` as one StorageError naming the path and the errno
    (the save it interrupts leaves the previous checkpoint whole: saves are atomic)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"writing {path} failed: {storage_cause(Path(path), e)}; the previous checkpoint is whole: "
                           "fix that, then continue with resume=true") from e


def storage_cause(path: Path, error: BaseException) -> str:
    """The OSError behind `error` as "[Errno N] reason", where one is in its chain (DCP wraps them in
    CheckpointException's failures); else a full disk, which torch's zip writer reports only as a
    position mismatch; else the error's first line."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return f"[Errno {e.errno}] {e.strerror}"
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and shutil.disk_usage(existing).free < 64 * 2**20:
        return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} ({shutil.disk_usage(existing).free // 2**20} MB free)"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:300]


def checkpoint_dirs(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """The directory of step's checkpoint, and the temporary one it is written in."""
    root = Path(run_dir) / "checkpoints"
    return root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"


def fresh_dir(tmp: Path) -> Path:
    """An empty directory at tmp (a killed write's leftovers removed)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path, keep: int | None = None) -> Path:
    """The one atomic write: every file under tmp synced to disk, then tmp renamed to final. keep:
    of final's step_* siblings, only the newest `keep` stay."""
    _fsync_tree(tmp)
    _replace_dir(tmp, final)
    for old in sorted(final.parent.glob("step_*"))[:-keep] if keep else ():
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (anything torch.save takes) as step_<step>; keep the newest `keep`."""
    final, tmp = checkpoint_dirs(run_dir, step)
    torch.save(state, fresh_dir(tmp) / "state.pt")
    return commit_dir(tmp, final, keep)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """This run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*"))


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    steps = checkpoints(run_dir)
    return steps[-1] if steps else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'state.pt'})")
    # Our own files: optimiser and RNG states are not plain tensors.
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt: torch says why, we say which file
        raise CheckpointDamaged(f"{path / 'state.pt'} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if state.get("sharded"):  # written by N ranks (DCP)
        check_dcp_shards(path / "dcp")
    return state


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be loaded whole; the message names the file."""


def check_dcp_shards(dcp_dir: Path) -> None:
    """Every shard file the DCP metadata lists exists and reaches the end of every item stored in it."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointDamaged(f"{dcp_dir / '.metadata'} is missing")
    try:
        metadata = FileSystemReader(str(dcp_dir)).read_metadata()
    except Exception as e:
        raise CheckpointDamaged(f"{dcp_dir / '.metadata'} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = dcp_dir / name
        have = shard.stat().st_size if shard.is_file() else None
        if have is None or have < size:
            raise CheckpointDamaged(f"{shard} is {'missing' if have is None else f'{have} bytes'}; its metadata "
                                    f"needs {size}")


def load_latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, newest first; each one that does not is named in a warning.
    Temporaries a killed save left behind are removed first."""
    for tmp in (Path(run_dir) / "checkpoints").glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for path in reversed(checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except (CheckpointDamaged, FileNotFoundError) as e:
            warnings.warn(f"checkpoint {path} is damaged: {e}; using the one before it", stacklevel=2)
    return None


# ---- model directories ---------------------------------------------------------------------------


def save_model(model, path: str | Path) -> Path:
    """model.save_pretrained(path), atomically."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    return commit_dir(tmp, final)


def check_model_dir(path: str | Path) -> None:
    """Raise ValueError naming what is wrong unless `path` holds a whole save_pretrained model:
    a parseable config.json and every weight file it needs, each readable to its end."""
    from safetensors import safe_open

    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():  # killed between the two renames of save_model
        os.replace(old, path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'} is missing or not JSON ({e})") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path} holds no model.safetensors (a save_pretrained model directory has one)")
    for name in files:
        try:
            with safe_open(str(path / name), "pt") as f:
                f.keys()
        except Exception as e:
            raise ValueError(f"weights file {path / name} is unreadable ({e})") from None
