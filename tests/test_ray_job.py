"""The `ray job submit` path itself, as the README gives it: a head with token authentication,
the RLP pipeline submitted with a few steps, its success awaited, its metrics read, the head
stopped. A client without the token is refused."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_rlp_pipeline_through_ray_job_submit(tmp_path):
    ray_cli = BIN / "ray"
    if not ray_cli.exists():
        pytest.skip("the ray command line is not installed beside this python")
    # The README's recipe: every client (the job submission, the job's driver) needs the cluster's token.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": "http://127.0.0.1:8265"}
    subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True)
    start = subprocess.run([str(ray_cli), "start", "--head", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        args = [f"out_dir={tmp_path}", "run_name=job", "data.num_docs=300", "data.seq_len=64", "data.vocab_size=512",
                "pretrain.steps=10", "train.steps=3", "optim.warmup_steps=1", "train.eval_every=3",
                "train.save_every=3", "wandb.mode=disabled", "rlp.thought_max_tokens=4"]
        job = subprocess.run([str(ray_cli), "job", "submit", "--working-dir", str(ROOT), "--",
                              "python", "pipelines/rlp_midtrain.py", *args],
                             env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
        assert "succeeded" in job.stdout
        records = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 3 and "eval/bpb" in records[-1]
        assert all(r["tokens/data"] > 0 for r in records[1:])
        stranger = {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}
        listing = subprocess.run([str(ray_cli), "job", "list"], env=stranger, capture_output=True, text=True, timeout=120)
        assert listing.returncode != 0 and "Unauthorized: Missing authentication token" in listing.stderr, listing.stderr
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
