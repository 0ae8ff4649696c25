"""Actors that hang or die in a real RLP run (subprocesses, a real local Ray cluster), each as
docs/reliability.md says:
- a rollout worker silent for rollout.timeout_s is left out of its steps and counted;
- a killed Learner ends the run in one line, exit 1;
- every rollout worker dying at every try ends it in one named line, exit 1;
and resume=true takes the run on after each, to its last step."""

import os
import signal
import time

import pytest

from tests.test_resume import finish, logged_steps, pipeline
from tests.test_worker_restart import actor_pids
from training.metrics import read_metrics

FAULTY = "reward=tests.faulty_reward:info_gain_unless_told"


def tell(faults, what: str, text: str = "") -> None:
    """Create faults/what whole (the workers read it at any moment)."""
    (faults / f".{what}").write_text(text)
    os.replace(faults / f".{what}", faults / what)


def stopped(proc) -> str:
    """The last line of a run that must have failed with exit status 1."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    return out.strip().splitlines()[-1]


def wait_for_step(proc, metrics, step: int) -> None:
    while max(logged_steps(metrics), default=-1) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_a_hung_worker_a_killed_learner_and_every_worker_dead(tmp_path, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("PONDER_FAULTS", str(faults))
    run, args = tmp_path / "run", ["run_name=run", "pretrain.steps=10", "train.steps=9", "train.save_every=2",
                                   "rollout.timeout_s=6", FAULTY]
    metrics = run / "metrics.jsonl"

    tell(faults, "hang", "15")  # the first thought group's worker sleeps 15 s: past the timeout
    proc = pipeline(tmp_path, *args)
    wait_for_step(proc, metrics, 3)
    [learner] = actor_pids(proc.pid, "Learner")
    os.kill(learner, signal.SIGKILL)
    last = stopped(proc)
    assert last.startswith("error: ActorDiedError: ") and last.endswith("continue with the same command and resume=true")
    records = read_metrics(metrics)
    hung = [r["step"] for r in records[1:] if r["rollouts/worker_timeouts"] > 0]
    assert hung and hung[0] == 1, [(r["step"], r["rollouts/worker_timeouts"]) for r in records[1:]]
    assert all(r["rlp/samples"] > 0 for r in records[1:])  # the other worker's rollouts trained every step

    proc = pipeline(tmp_path, *args, "resume=true")
    wait_for_step(proc, metrics, 6)
    tell(faults, "exit")  # from now on every worker dies at its first reward, in every life
    last = stopped(proc)
    assert last.startswith("error: none of the 2 rollout workers returned rollouts for this step (restarts "), last
    assert last.endswith("resume=true continues from the last checkpoint"), last

    (faults / "exit").unlink()
    finish(pipeline(tmp_path, *args, "resume=true"))
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == list(range(10))
    assert records[-1]["rollouts/worker_timeouts"] == max(r["rollouts/worker_timeouts"] for r in records[1:]) > 0
