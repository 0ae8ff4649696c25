"""RPT, reinforcement pre-training (methods.md §2), on RLP's Ray graph: the same rollout pool,
learner group and weight sync (training/graph.py), with RPT's positions and responses.

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

from training.graph import build_graph, cli, placement  # noqa: E402
from rollout.rpt import RPTWorker  # noqa: E402
from training.cluster import driver_threads, start_ray  # noqa: E402
from training.config import CONFIG_DIR, RPTTrainConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.preflight import (check_base, check_data_files, check_proxy_vocab, check_tokenizer_fits,  # noqa: E402
                                with_base_tokenizer)
from training.rlp_loop import run_graph  # noqa: E402
from training.rpt import RPTAccuracy  # noqa: E402
from training.run import (config_errors_exit, outputs_line, parse_config_or_exit, prepare_run_dir,  # noqa: E402
                          think_ready_base)


CANNOT_ANSWER = ("few responses reach the eos token within rpt.response_max_tokens, so few close a box and the reward "
                 "is mostly 0. Start from a base that writes \"</think>\\boxed{...}\" (bench/rpt_vs_trl.py shows a short "
                 "warm-up on that format) or raise rpt.response_max_tokens.")


def main(argv: list[str]) -> dict:
    cfg = parse_config_or_exit(RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml", argv)
    driver_threads()
    torch.manual_seed(cfg.seed)
    with config_errors_exit():  # bad inputs named in one line, before Ray starts
        base = Path(cfg.base).expanduser().resolve()
        check_base(base)
        check_data_files(cfg.data)
        proxy = Path(cfg.rpt.proxy).expanduser().resolve() if cfg.rpt.proxy else base  # by default the base itself
        cfg = with_base_tokenizer(cfg, base)
        check_proxy_vocab(proxy, base, cfg.data.tokenizer)  # it scores contexts, which hold no think token
        run_dir = prepare_run_dir(cfg)
        given, (cfg, base) = base, think_ready_base(cfg, base, run_dir)  # <think>, </think> added where missing
        if proxy == given:  # the base as its own proxy: the prepared copy, so the two share a vocabulary
            proxy = base
        cfg = dataclasses.replace(cfg, rpt=dataclasses.replace(cfg.rpt, proxy=str(proxy)))
        data = prepare_data(cfg.data, run_dir, cfg.seed)
        check_tokenizer_fits(base, data.tokenizer)
    started = start_ray(cfg.ray_address)
    try:
        with config_errors_exit():  # a resource request the cluster cannot hold: one line, before anything runs
            groups = placement(cfg)
        # RLP's learner (its policy loss over every response token; rlp.ttt_weight=0: no next-token term)
        # and rollout workers that choose positions and write responses as RPT does.
        learner, workers = build_graph(cfg, data, base, run_dir, groups, task_eval=rpt_accuracy(cfg, data),
                                       worker=RPTWorker, rpt_cfg=cfg.rpt)
        with config_errors_exit():  # a learner that cannot see the run directory: one line
            summary = run_graph(cfg, learner, workers, data, run_dir, cannot_think=CANNOT_ANSWER)
    finally:
        if started:
            ray.shutdown()
    print("next-token accuracy (held-out, by proxy entropy): " + ", ".join(
        f"{b} {summary.get(f'eval/rpt_acc_{b}', float('nan')):.3f} (n={summary.get(f'eval/rpt_n_{b}', 0)})"
        for b in ("easy", "medium", "hard")))
    print(outputs_line(run_dir))
    return summary


def rpt_accuracy(cfg: RPTTrainConfig, data) -> RPTAccuracy | None:
    """The held-out positions the learner evaluates next-token accuracy on (None: rpt.eval_positions=0)."""
    from transformers import AutoModelForCausalLM

    if not cfg.rpt.eval_positions:
        return None
    proxy = AutoModelForCausalLM.from_pretrained(cfg.rpt.proxy).eval()
    accuracy = RPTAccuracy(data.tokenizer, proxy, data.heldout_windows, cfg.rpt.eval_positions, cfg.rlp.min_context,
                           cfg.rpt.entropy_top_k, cfg.rpt.response_max_tokens, cfg.reward, cfg.seed)
    print(f"RPT evaluation: {len(accuracy)} held-out positions with proxy entropy > 0.5")
    return accuracy


if __name__ == "__main__":
    cli(main)
