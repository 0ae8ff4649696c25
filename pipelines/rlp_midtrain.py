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

from training.checkpoint import checkpoint_step, check_model_dir, latest_checkpoint  # noqa: E402
from training.cluster import start_ray  # noqa: E402
from training.config import CONFIG_DIR, LoopConfig, PretrainConfig, RLPMidtrainConfig, WandbConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.graph import build_graph, cli, placement  # noqa: E402
from training.optim import steps_for_tokens  # noqa: E402
from training.rlp_loop import run_graph  # noqa: E402
from training.preflight import check_base, check_data_files, check_tokenizer_fits  # noqa: E402
from training.run import (check_vllm_serves, config_errors_exit, parse_config_or_exit, prepare_run_dir,  # noqa: E402
                          resolve_device, think_ready_base)
from training.trainer import run_pretraining  # noqa: E402


def pretrain_base(cfg: RLPMidtrainConfig, data, run_dir: Path, device) -> Path:
    """A briefly pretrained base model, checkpointed as it goes: a finished one is reused, a
    killed one continues from its last checkpoint."""
    base_dir, p = run_dir / "base", cfg.pretrain
    last = latest_checkpoint(base_dir)
    if last is not None and checkpoint_step(last) >= p.steps:
        try:
            check_model_dir(base_dir / "model")
            print(f"using the base model pretrained earlier in {base_dir}")
            return base_dir / "model"
        except ValueError as e:
            print(f"the base model pretrained earlier is unusable ({e}): pretraining it again")
            last = None
    print(f"no base model given: pretraining {cfg.model.name} ({cfg.model.mode}) for {p.steps} steps"
          + (f", from step {checkpoint_step(last)}" if last is not None else "")
          + (" on documents with worked solutions as thoughts (pretrain.augment=think), so the policy can think"
             if p.augment == "think" else f" (pretrain.augment={p.augment})"))
    base_data = dataclasses.replace(cfg.data, augment=p.augment)
    if p.augment != cfg.data.augment:  # the same corpus, split and tokenizer; thoughts in the train documents
        data = prepare_data(dataclasses.replace(base_data, tokenizer=cfg.data.tokenizer or str(run_dir / "tokenizer")),
                            run_dir, cfg.seed)
    pre = PretrainConfig(
        run_name="base", out_dir=str(run_dir), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
        resume=last is not None, model=cfg.model, ttt=cfg.ttt, data=base_data,
        optim=dataclasses.replace(cfg.optim, lr=p.lr, end_lr=p.lr / 100, warmup_steps=min(30, p.steps)),
        train=LoopConfig(steps=p.steps, batch_size=p.batch_size, eval_every=p.eval_every,
                         save_every=min(p.save_every, p.steps), eval_windows=cfg.train.eval_windows, log_every=10),
        wandb=WandbConfig(mode="disabled"),
    )
    run_pretraining(pre, data, base_dir, device)
    return base_dir / "model"


def main(argv: list[str]) -> dict:
    cfg = parse_config_or_exit(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", argv)
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
        base = base or pretrain_base(cfg, data, run_dir, device)
        learner, workers = build_graph(cfg, data, base, run_dir, groups)
        with config_errors_exit():  # a learner that cannot see the run directory: one line
            summary = run_graph(cfg, learner, workers, data, run_dir)
    finally:
        if started:
            ray.shutdown()
    print(f"outputs in {run_dir}/: model/ (from_pretrained), checkpoints/, metrics.jsonl, thoughts.jsonl, base/, wandb/")
    if "rlp/thinking" in summary:
        print(summary["rlp/thinking"])
    return summary


if __name__ == "__main__":
    cli(main)
