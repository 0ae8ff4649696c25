"""One run at a time on a run directory: <run_dir>/.lock names the process that holds it.

A second run on a live directory (a fresh start, which would move it aside, or a resume) stops
before touching anything, naming the holder's pid and host. A lock whose process is gone (a killed
run) is taken over, and said so. The holder's lock is removed when its process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from training.config import ConfigError

LOCK = ".lock"


def holder(run_dir: Path) -> dict | None:
    """The live process holding run_dir's lock, or None (no lock, a stale one, or one of this process)."""
    path = run_dir / LOCK
    try:
        held = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written this instant, or garbage left by a crash
        young = path.exists() and time.time() - path.stat().st_mtime < 5
        return {"pid": "?", "host": "?", "started": "just now"} if young else None
    if mine(path):
        return None
    if held.get("host") == socket.gethostname() and not alive(held.get("pid", -1)):
        return None
    return held


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def check_unlocked(run_dir: Path) -> None:
    """A ConfigError naming the holder when a live run holds run_dir."""
    held = holder(run_dir)
    if held is not None:
        raise ConfigError(f"{run_dir} is in use by a run (pid {held.get('pid')} on {held.get('host')}, started "
                          f"{held.get('started')}): wait for it to end, or give another run_name"
                          + ("" if held.get("host") == socket.gethostname() else
                             f"; if that run is gone, delete {run_dir / LOCK}"))


def lock(run_dir: Path) -> None:
    """Hold run_dir for this process (taking over a stale lock); released at exit. The lock file is
    created exclusively, so of two runs starting together one wins and the other is refused."""
    path = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if mine(path):  # this process holds it already (an earlier run of this directory in-process)
                return
            check_unlocked(run_dir)  # a live holder: refused
            path.unlink(missing_ok=True)
            print(f"{path}: the run that held it is gone; taken over")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        atexit.register(release, path, os.getpid())
        return
    raise ConfigError(f"{path}: another run took the lock while this one started; give another run_name")


def mine(path: Path) -> bool:
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()


def release(path: Path, pid: int) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass
