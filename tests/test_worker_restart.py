"""A rollout worker killed with SIGKILL in the middle of an RLP run: Ray starts it again, it takes
the current weights, its shard is retried, and the run completes with the restart counted."""

import os
import signal
import subprocess
import time

import pytest

from tests.test_resume import finish, logged_steps, pipeline
from training.metrics import read_metrics


def actor_pids(session: int, actor: str) -> list[int]:
    """The processes of one run's actors of a class (its own session: other Ray clusters untouched)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(pid) for pid, sid, args in (line.split(None, 2) for line in out.splitlines() if line.strip())
            if int(sid) == session and args.startswith(f"ray::{actor}")]


def rollout_worker_pids(session: int) -> list[int]:
    return actor_pids(session, "RolloutWorker")


@pytest.mark.slow
def test_a_killed_worker_comes_back_and_the_run_completes(tmp_path):
    run = tmp_path / "run"
    proc = pipeline(tmp_path, "run_name=run", "train.steps=10", "train.save_every=5")
    deadline = time.monotonic() + 300
    while max(logged_steps(run / "metrics.jsonl"), default=-1) < 2:  # RLP under way
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    pids = rollout_worker_pids(proc.pid)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    finish(proc)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(11))
    assert records[-1]["rollouts/worker_restarts"] >= 1
    # After the restart every step still had both workers' rollouts.
    assert all(r["rlp/samples"] > 0 for r in records[1:])
    deadline = time.monotonic() + 60  # the run shuts its cluster down (worker processes exit shortly after)
    while rollout_worker_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rollout_worker_pids(proc.pid) == []
