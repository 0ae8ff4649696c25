"""The Ray cluster a pipeline starts for itself (training/cluster.py) refuses a client without
its token, even under RAY_AUTH_MODE=disabled: Ray binds its servers to every interface, so
loopback alone cannot keep other hosts out. A client with the token is let in."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Starts the pipeline's own cluster, then tries it with a client of each kind.
SCRIPT = """
import os, subprocess, sys
import ray
from training.cluster import start_ray

assert start_ray("")
gcs = ray._private.worker.global_worker.node.gcs_address
connect = f"import ray; ray.init(address={gcs!r}); print(int(ray.cluster_resources()['CPU']))"
plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
for name, env in (("without", {**plain, "RAY_AUTH_MODE": "disabled"}), ("with", {**plain, "RAY_AUTH_MODE": "token"})):
    client = subprocess.run([sys.executable, "-c", connect], env=env, capture_output=True, text=True, timeout=120)
    print(f"{name} the token: rc {client.returncode}, out {client.stdout.strip()!r}")
    print(client.stderr.strip().splitlines()[-1] if client.returncode else "")
"""


@pytest.mark.slow
def test_the_pipelines_own_cluster_refuses_a_client_without_its_token(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    print(out)
    without = out[out.index("without the token"):]
    assert without.startswith("without the token: rc 1") and "Failed to connect to Ray cluster" in without, out
    assert "with the token: rc 0, out '" in out, out  # let in: it read the cluster's CPUs
