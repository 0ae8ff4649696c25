"""RPT, reinforcement pre-training (methods.md §2), on RLP's Ray graph: the same rollout pool,
learner group and weight sync (pipelines/rlp_midtrain.py), with RPT's positions and responses.

    python pipelines/rpt_train.py base=runs/rlp_midtrain/base/model
    python pipelines/rpt_train.py base=<a Hugging Face causal LM dir> rpt.proxy=<a smaller one>
    ray job submit --working-dir . -- python pipelines/rpt_train.py base=... rpt.entropy_threshold=1.0

Positions: where the proxy's entropy over its top-16 next tokens is above rpt.entropy_threshold
(0.5 nats). Each of G = 8 responses (temperature 0.8) is a thought then \\boxed{prediction},
rewarded 1 when the prediction's bytes are a prefix of the true continuation ending on a token
boundary. GRPO group advantages, exactly on-policy (synchronous rollouts, rlp.max_staleness=0),
no KL, no next-token term. Evaluation: eval/rpt_acc_{easy,medium,hard} on held-out positions.
Outputs in <out_dir>/<run_name>/: model/, checkpoints/, metrics.jsonl, thoughts.jsonl, wandb/.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a Ray working_dir

import ray  # noqa: E402
import torch  # noqa: E402

from pipelines.rlp_midtrain import base_counters, placement  # noqa: E402
from rollout.pool import AllWorkersFailed, RolloutPool  # noqa: E402
from rollout.rpt import RPTWorker  # noqa: E402
from training.cluster import start_ray  # noqa: E402
from training.config import CONFIG_DIR, RPTTrainConfig  # noqa: E402
from training.data import WindowLoader, prepare_data  # noqa: E402
from training.distributed import in_bundle  # noqa: E402
from training.learner_group import start_learners  # noqa: E402
from training.metrics import MetricsLogger  # noqa: E402
from training.preflight import (check_base, check_data_files, check_proxy_vocab, check_tokenizer_fits,  # noqa: E402
                                tokenizer_beside)
from training.rlp_loop import DroppedRewardsError, RLPLoop  # noqa: E402
from training.rpt import RPTAccuracy  # noqa: E402
from training.run import config_errors_exit, parse_config_or_exit, prepare_run_dir  # noqa: E402


CANNOT_ANSWER = ("few responses reach the eos token within rpt.response_max_tokens, so few close a box and the reward "
                 "is mostly 0. Start from a base that writes \"</think>\\boxed{...}\" (bench/rpt_vs_trl.py shows a short "
                 "warm-up on that format) or raise rpt.response_max_tokens.")


def main(argv: list[str]) -> dict:
    cfg = parse_config_or_exit(RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml", argv)
    torch.manual_seed(cfg.seed)
    with config_errors_exit():  # bad inputs named in one line, before Ray starts
        base = Path(cfg.base).expanduser().resolve()
        check_base(base)
        check_data_files(cfg.data)
        proxy = Path(cfg.rpt.proxy).expanduser().resolve() if cfg.rpt.proxy else base
        if not cfg.data.tokenizer and tokenizer_beside(base):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer_beside(base))))
        cfg = dataclasses.replace(cfg, rpt=dataclasses.replace(cfg.rpt, proxy=str(proxy)))
        run_dir = prepare_run_dir(cfg)
        data = prepare_data(cfg.data, run_dir, cfg.seed)
        check_tokenizer_fits(base, data.tokenizer)
        check_proxy_vocab(proxy, base, data.tokenizer)
    tokenizer_dir = str(Path(cfg.data.tokenizer).resolve()) if cfg.data.tokenizer else str(run_dir / "tokenizer")
    started = start_ray(cfg.ray_address)
    try:
        learner, workers = build_graph(cfg, data, base, tokenizer_dir, run_dir, placement(cfg))
        pool = RolloutPool(workers, cfg.rollout.timeout_s)
        if cfg.sync.method == "collective":
            pool.start_collective(learner, cfg.sync.bucket_mb)
        loop = RLPLoop(cfg, learner, pool, WindowLoader(data.train_windows, cfg.rollout.windows_per_step, cfg.seed),
                       cannot_think=CANNOT_ANSWER)
        resumed = ray.get(learner.resume.remote()) if cfg.resume else None
        if resumed is not None:
            loop.load_state_dict(resumed)
        logger = MetricsLogger(run_dir, config=dataclasses.asdict(cfg), wandb_mode=cfg.wandb.mode,
                               project=cfg.wandb.project, entity=cfg.wandb.entity, run_name=cfg.run_name,
                               resume_step=resumed["version"] if resumed else None)
        try:
            summary = loop.run(logger, start=resumed["version"] if resumed else 0,
                               first_extra={"data/docs_skipped": data.docs_skipped})
        finally:
            logger.close()
    finally:
        if started:
            ray.shutdown()
    print("next-token accuracy (held-out, by proxy entropy): " + ", ".join(
        f"{b} {summary.get(f'eval/rpt_acc_{b}', float('nan')):.3f} (n={summary.get(f'eval/rpt_n_{b}', 0)})"
        for b in ("easy", "medium", "hard")))
    print(f"outputs in {run_dir}/: model/ (from_pretrained), checkpoints/, metrics.jsonl, thoughts.jsonl, wandb/")
    return summary


def build_graph(cfg: RPTTrainConfig, data, base: Path, tokenizer_dir: str, run_dir: Path, groups):
    """The learner ranks (RLP's learner: its policy loss over every response token, no next-token
    term) and the RPTWorker actors, all starting from `base`."""
    from transformers import AutoModelForCausalLM

    tok, rpt = data.tokenizer, cfg.rpt
    accuracy = None
    if rpt.eval_positions:
        proxy = AutoModelForCausalLM.from_pretrained(rpt.proxy).eval()
        accuracy = RPTAccuracy(tok, proxy, data.heldout_windows, rpt.eval_positions, cfg.rlp.min_context,
                               rpt.entropy_top_k, rpt.response_max_tokens, cfg.reward, cfg.seed)
        print(f"RPT evaluation: {len(accuracy)} held-out positions with proxy entropy > 0.5")
    learner_pg, worker_pg = groups
    learner = start_learners(cfg, learner_pg, cfg, str(base), str(run_dir), data.heldout_windows, data.token_bytes,
                             tok.convert_tokens_to_ids("<think>"), tok.pad_token_id, task_eval=accuracy,
                             initial_counters=base_counters(base))
    r = cfg.rollout
    workers = [ray.remote(RPTWorker).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker, max_restarts=-1,
                                             **in_bundle(worker_pg, i))
               .remote(str(base), tokenizer_dir, cfg.rlp, rpt, cfg.reward, cfg.seed * 1000 + i, None, engine=r.engine)
               for i in range(r.num_workers)]
    return learner, workers


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (DroppedRewardsError, AllWorkersFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
