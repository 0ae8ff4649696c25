"""Rollout workers that hang or die, in a real RLP run (subprocesses, a real local Ray cluster): a
worker silent for rollout.timeout_s is left out of its steps and counted; when every worker dies
at every try the run stops with one named line and exit 1, and resume=true finishes it."""

import os
import subprocess

import pytest

from tests.test_resume import finish, logged_steps, pipeline
from training.metrics import read_metrics

FAULTY = "reward=tests.faulty_reward:info_gain_unless_told"


def tell(faults, what: str, text: str = "") -> None:
    """Create faults/what whole (the workers read it at any moment)."""
    (faults / f".{what}").write_text(text)
    os.replace(faults / f".{what}", faults / what)


@pytest.mark.slow
def test_a_hung_worker_is_left_out_and_every_worker_dead_stops_the_run_which_resumes(tmp_path, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("PONDER_FAULTS", str(faults))
    run, args = tmp_path / "run", ["run_name=run", "pretrain.steps=10", "train.steps=8", "train.save_every=2",
                                   "rollout.timeout_s=6", FAULTY]
    tell(faults, "hang", "15")  # the first thought group's worker sleeps 15 s: past the timeout
    proc = pipeline(tmp_path, *args)
    while max(logged_steps(run / "metrics.jsonl"), default=-1) < 4:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert not (faults / "hang").exists()
    tell(faults, "exit")  # from now on every worker dies at its first reward, in every life
    out, _ = proc.communicate(timeout=600)
    last = out.strip().splitlines()[-1]
    assert proc.returncode == 1, out[-3000:]
    print(last)
    assert last.startswith("error: none of the 2 rollout workers returned rollouts for this step (restarts "), last
    assert last.endswith("resume=true continues from the last checkpoint"), last
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["step"] >= 4
    hung = [r for r in records[1:] if r["rollouts/worker_timeouts"] > 0]
    assert hung and hung[0]["step"] == 1, [(r["step"], r["rollouts/worker_timeouts"]) for r in records]
    assert all(r["rlp/samples"] > 0 for r in records[1:])  # the other worker's rollouts trained every step

    (faults / "exit").unlink()
    finish(pipeline(tmp_path, *args, "resume=true"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(9))
    print([(r["step"], r["rollouts/worker_timeouts"], r["rollouts/worker_restarts"]) for r in records[1:]])
    assert records[-1]["rollouts/worker_timeouts"] == max(r["rollouts/worker_timeouts"] for r in records[1:]) > 0
