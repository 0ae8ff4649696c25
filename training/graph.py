"""RLP's Ray graph, built once for every pipeline that runs on it (rlp_midtrain, rpt_train): the
placement groups, the learner ranks and the rollout workers, and the command-line wrapper that
reports the graph's failures in one line.

    groups = placement(cfg)                                    # fails before any actor exists
    learner, workers = build_graph(cfg, data, base, run_dir, groups)
    summary = run_graph(cfg, learner, workers, data, run_dir)  # training/rlp_loop.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import ray

from rollout.pool import AllWorkersFailed
from rollout.worker import RolloutWorker
from training.distributed import ResourceError, bundle, check_resources, cluster_nodes, in_bundle, place
from training.evaluate import TaskAccuracy
from training.learner_group import learner_bundles, start_learners
from training.metrics import base_counters
from training.rlp_loop import DroppedRewardsError
from training.run import storage_errors_exit


def build_graph(cfg, data, base: Path, run_dir: Path, groups, task_eval=None,
                worker=RolloutWorker, **worker_kwargs):
    """The learner ranks (one LearnerGroup) and the rollout worker actors (`worker`, given
    worker_kwargs besides the RolloutWorker arguments), all starting from `base`, each on the device
    Ray assigned it. task_eval: what the learner evaluates besides bpb (default: held-out problems
    when train.task_problems)."""
    tok = data.tokenizer
    # The run's tokenizer, where every worker loads it: the one given, or the one trained into the run.
    tokenizer_dir = str(Path(cfg.data.tokenizer).resolve()) if cfg.data.tokenizer else str(run_dir / "tokenizer")
    if task_eval is None and cfg.train.task_problems:
        task_eval = TaskAccuracy(tok, data.heldout_docs, cfg.train.task_problems, cfg.train.task_max_new_tokens,
                                 think_tokens=cfg.rlp.thought_max_tokens)
    learner_pg, worker_pg = groups
    learner = start_learners(cfg, learner_pg, cfg, str(base), str(run_dir), data.heldout_windows, data.token_bytes,
                             tok.convert_tokens_to_ids("<think>"), tok.pad_token_id, task_eval=task_eval,
                             initial_counters=base_counters(base))
    # A worker whose process dies is started again by Ray (in its bundle); the pool gives it the current weights.
    r = cfg.rollout
    workers = [ray.remote(worker).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, max_restarts=-1,
                                          **in_bundle(worker_pg, i))
               .remote(str(base), tokenizer_dir, cfg.rlp, cfg.reward, cfg.seed * 1000 + i, None, engine=r.engine,
                       **worker_kwargs)
               for i in range(r.num_workers)]
    return learner, workers


def placement(cfg):
    """Placement groups for the learner ranks and the rollout workers, from the resource keys.
    A request the cluster cannot hold fails here, before any actor exists, naming what is missing."""
    r, lc = cfg.rollout, cfg.learner
    groups = {"learner": learner_bundles(cfg), "rollout": [bundle(r.cpus_per_worker, r.gpus_per_worker)] * r.num_workers}
    check_resources(groups, ray.cluster_resources(), cluster_nodes())
    learner = place(groups["learner"], lc.placement, lc.placement_timeout_s, "learner ranks")
    try:
        return learner, place(groups["rollout"], r.placement, lc.placement_timeout_s, "rollout workers")
    except ResourceError:
        ray.util.remove_placement_group(learner)
        raise


def cli(entry) -> None:
    """entry(sys.argv[1:]), with the graph's failures (rewards dropped, workers or learner lost)
    reported in one line and exit status 1."""
    try:
        with storage_errors_exit():  # a full disk, a permission: one line naming the path and the errno
            entry(sys.argv[1:])
    except (DroppedRewardsError, AllWorkersFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except ray.exceptions.RayActorError as e:  # a learner or worker killed: the checkpoints stay whole
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0]}; continue with the same command and "
              "resume=true", file=sys.stderr)
        raise SystemExit(1) from None
