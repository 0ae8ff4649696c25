import os
import shutil
import sys
from pathlib import Path

import pytest

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# anything imports triton (torch itself may, through torch._dynamo).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Nothing is fetched from a hub, nothing is uploaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's memory monitor counts a container's page cache as used memory and then kills the busiest
# worker; a CI box that just installed the stack can look full while it is not.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module, its workers importing this checkout."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()
