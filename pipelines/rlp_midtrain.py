"""RLP mid-training (methods.md §1, §6) on one Ray graph: rollout workers sample thoughts from a
policy whose fast weights have read the context and reward them by information gain; the learner
trains L = w_rlp·L_RLP + λ·L_NTP with one backward through the inner loop.

    python pipelines/rlp_midtrain.py                                  # starts a local Ray
    ray job submit --working-dir . -- python pipelines/rlp_midtrain.py reward=rpt_prefix_match
    python pipelines/rlp_midtrain.py base=runs/ttt_pretrain/model     # start from a trained model

With no `base` it first pretrains the configured model briefly (`pretrain.*`). Outputs in
<out_dir>/<run_name>/ (out_dir=runs; under `ray job submit` ~/ponder/runs, see README): base/ (that
pretraining), model/, checkpoints/, metrics.jsonl, wandb/. `resume=true` continues a killed run
exactly where its last checkpoint left it, base pretraining included; `resume=auto` continues it
or starts one.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a Ray working_dir

import ray  # noqa: E402
import torch  # noqa: E402

from training.cluster import driver_threads, start_ray  # noqa: E402
from training.config import CONFIG_DIR, RLPMidtrainConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.graph import build_graph, cli, placement  # noqa: E402
from training.optim import steps_for_tokens  # noqa: E402
from training.rlp_loop import run_graph  # noqa: E402
from training.preflight import check_base, check_data_files, check_tokenizer_fits  # noqa: E402
from training.run import (check_vllm_serves, config_errors_exit, outputs_line, parse_config_or_exit,  # noqa: E402
                          prepare_run_dir, resolve_device, think_ready_base)
from training.stages import format_warmup, pretrain_base  # noqa: E402


def main(argv: list[str]) -> dict:
    cfg = parse_config_or_exit(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", argv)
    driver_threads()
    torch.manual_seed(cfg.seed)
    with config_errors_exit():  # bad inputs named in one line, before Ray starts
        device = resolve_device(cfg.device)
        base = Path(cfg.base).expanduser().resolve() if cfg.base else None
        check_data_files(cfg.data)
        if base is not None:
            check_base(base)
        run_dir = prepare_run_dir(cfg)
        if base is not None:  # the tokenizer the base was trained with, <think> and </think> added where missing
            cfg, base = think_ready_base(cfg, base, run_dir)
        data = prepare_data(cfg.data, run_dir, cfg.seed)
        if base is not None:
            check_tokenizer_fits(base, data.tokenizer)
    if cfg.train.data_tokens:  # steps follow from the corpus tokens to spend
        steps = steps_for_tokens(cfg.train.data_tokens, cfg.rollout.windows_per_step * cfg.data.seq_len)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps),
                                  optim=dataclasses.replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps)))

    if cfg.rollout.engine == "vllm":
        with config_errors_exit():  # a model vLLM cannot serve fails here, before Ray starts
            check_vllm_serves(base, cfg.model, data.tokenizer, cfg.ttt)
    started = start_ray(cfg.ray_address)
    try:
        with config_errors_exit():  # a resource request the cluster cannot hold: one line, before anything runs
            groups = placement(cfg)
        if base is None:
            base = pretrain_base(cfg, data, run_dir, device)
        elif cfg.warmup.steps:  # a given base learns RLP's format first
            base = format_warmup(cfg, data, base, run_dir, device)
        learner, workers = build_graph(cfg, data, base, run_dir, groups)
        with config_errors_exit():  # a learner that cannot see the run directory: one line
            summary = run_graph(cfg, learner, workers, data, run_dir)
    finally:
        if started:
            ray.shutdown()
    print(outputs_line(run_dir))
    if "rlp/thinking" in summary:
        print(summary["rlp/thinking"])
    return summary


if __name__ == "__main__":
    cli(main)
