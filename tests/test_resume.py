"""Kill -9 and resume: a run of pipelines/rlp_midtrain.py killed during its base pretraining, then
again during RLP, and resumed each time with resume=true (taking over the dead run's lock), logs the
same metrics, example thoughts and summary as a run never killed, bit for bit (timings aside). Real
subprocesses, a real local Ray cluster, SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from training.metrics import read_metrics

ARGS = ["data.num_docs=300", "data.seq_len=64", "data.vocab_size=512", "model.hidden_size=32",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.mini_batch_size=16", "model.sliding_window=16", "pretrain.steps=60", "pretrain.save_every=10",
        "pretrain.batch_size=4", "pretrain.eval_every=30", "train.steps=12", "train.save_every=3", "train.eval_every=4",
        "train.eval_windows=8", "optim.warmup_steps=1", "rlp.thought_max_tokens=4", "rlp.group_size=2",
        "wandb.mode=disabled"]


def pipeline(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "pipelines" / "rlp_midtrain.py"), f"out_dir={tmp_path}",
           f"data.cache_dir={tmp_path / 'cache'}", *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    # A session of its own: the kill takes the driver and the Ray cluster it started, as a crash would.
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_when(proc, ready, timeout=300) -> None:
    """SIGKILL the process group as soon as ready() holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def logged_steps(path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(path)]
    except (OSError, ValueError):  # not there yet, or a line half written
        return []


def comparable(records):
    """Every metric but wall-clock ones, by step."""
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in records}


@pytest.mark.slow
def test_kill_9_twice_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole_out = finish(pipeline(tmp_path, "run_name=whole"))

    run = tmp_path / "killed"
    proc = pipeline(tmp_path, "run_name=killed")  # killed during base pretraining
    kill_when(proc, lambda: any(int(p.name[5:]) >= 20 for p in (run / "base" / "checkpoints").glob("step_*")))
    k = random.randint(4, 9)  # past the first RLP checkpoint (step 3)
    proc = pipeline(tmp_path, "run_name=killed", "resume=true")  # killed during RLP, after step k
    kill_when(proc, lambda: max(logged_steps(run / "metrics.jsonl"), default=-1) >= k)
    out = finish(pipeline(tmp_path, "run_name=killed", "resume=true"))
    assert "resumed" in out

    for name in ("base/metrics.jsonl", "metrics.jsonl"):
        whole = comparable(read_metrics(tmp_path / "whole" / name))
        resumed = comparable(read_metrics(run / name))
        assert list(resumed) == list(whole), name  # no step lost, none twice
        for step in whole:
            assert resumed[step] == whole[step], (name, step, k)
    assert resumed[12]["rlp/reward_mean"] is not None and resumed[12]["tokens/data"] > 0
    # The example thoughts hold every step once, as the whole run's; the summary covers the whole run.
    assert read_metrics(run / "thoughts.jsonl") == read_metrics(tmp_path / "whole" / "thoughts.jsonl")

    def summary(out):
        return next(line for line in out.splitlines() if "mean information gain" in line)

    assert summary(out) == summary(whole_out)
