"""Where a run's outputs live and how its Ray cluster starts, so that both survive `ray job submit`.

Under `ray job submit --working-dir .` the driver runs inside Ray's temporary copy of the working
directory, which Ray deletes: a relative out_dir there resolves under $PONDER_HOME (default
~/ponder) instead. Actors of a cluster started here get the driver's PYTHONPATH (a user's reward
module, say) merged with this checkout's: a runtime_env's PYTHONPATH replaces the workers' own
rather than extending it. A submitted job's actors get what `--runtime-env-json` gives them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # this checkout (or the job's copy of it)
SUBMITTED = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def submitted_job() -> bool:
    return SUBMITTED in os.environ


def driver_threads() -> None:
    """A submitted job's driver starts with OMP_NUM_THREADS=1, Ray's setting for a task without CPUs,
    which would leave the training the driver does itself (a base's pretraining, a format warm-up)
    on one core: there it uses the cores it may run on, as a driver started by hand does."""
    if submitted_job():
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))


def outputs_root(out_dir: str) -> Path:
    """out_dir as an absolute path that outlives the job."""
    path = Path(out_dir).expanduser()
    if path.is_absolute():
        return path
    if submitted_job():
        return Path(os.environ.get("PONDER_HOME", "~/ponder")).expanduser().resolve() / path
    return path.resolve()


def worker_pythonpath(*first: str) -> str:
    """`first`, then the entries of the user's PYTHONPATH."""
    user = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([*first, *user]))


def start_ray(address: str) -> bool:
    """Join or start a Ray cluster; True if this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if submitted_job():  # the job's own runtime_env (--working-dir, --runtime-env-json) ships the code
        ray.init()
    elif address:  # a running cluster: ship this checkout (not the venv or outputs)
        env = {"env_vars": {"PYTHONPATH": worker_pythonpath()}} if os.environ.get("PYTHONPATH") else {}
        ray.init(address=address, runtime_env={"working_dir": str(ROOT), **env,
                                               "excludes": [".venv", "runs", ".cache", "wandb", ".git"]})
    else:  # a local cluster on this machine
        # Ray binds its servers to every interface, so the cluster a run starts for itself always
        # asks for Ray's token (~/.ray/auth_token, made if missing): nothing outside the run needs in.
        # Ray's own default for a new local cluster, whatever RAY_AUTH_MODE says.
        os.environ.pop("RAY_AUTH_MODE", None)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # address="local": a cluster of its own, never one that another `ray start` left on this machine
        ray.init(address="local", include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath(str(ROOT))}})
    return True
