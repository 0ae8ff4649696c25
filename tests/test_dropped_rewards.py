"""A user's reward module outside the repository, found through PYTHONPATH by every rollout worker
of a real local Ray cluster; when it fails for every thought the run stops, naming the error."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from training.metrics import read_metrics

ARGS = ["data.num_docs=300", "data.seq_len=64", "data.vocab_size=512", "model.hidden_size=32",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.mini_batch_size=16", "model.sliding_window=16", "pretrain.steps=4", "pretrain.batch_size=4",
        "train.steps=10", "train.eval_windows=8", "optim.warmup_steps=1", "rlp.thought_max_tokens=4",
        "rlp.group_size=2", "rlp.max_dropped_steps=2", "wandb.mode=disabled"]


@pytest.mark.slow
def test_reward_module_on_pythonpath_that_always_raises_stops_the_run(tmp_path):
    user = tmp_path / "user_code"
    user.mkdir()
    (user / "mymod.py").write_text("def no_reward(inp):\n    raise ZeroDivisionError('my reward divides by zero')\n")
    env = {**os.environ, "PYTHONPATH": str(user), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "pipelines" / "rlp_midtrain.py"), f"out_dir={tmp_path}",
                          "run_name=r", f"data.cache_dir={tmp_path / 'cache'}", "reward=mymod:no_reward", *ARGS],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    # The workers imported mymod (else they would fail on "No module named"), ran it, and quote it.
    assert last.startswith("error: reward=mymod:no_reward dropped more than rlp.max_dropped_frac=0.5"), last
    assert "2 steps in a row" in last and "ZeroDivisionError: my reward divides by zero" in last
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # stopped at the second bad step, its record written
    assert all(r["rollouts/dropped_reward_frac"] == 1.0 for r in records[1:])
    assert records[0]["data/docs_skipped"] == 0
