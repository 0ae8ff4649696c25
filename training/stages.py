"""The stages before RLP that make its starting policy think in its format: pretraining a base when
none is given, and the format warm-up of a given one (a real pretrained model has never seen
<think> ... </think>). Both train next-token on the corpus with its worked solutions written as
thoughts (data.augment=think), checkpointed as they go: a finished stage is reused, a killed one
continues from its last checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from rollout.worker import RolloutWorker
from training.checkpoint import check_model_dir, checkpoint_step, latest_checkpoint
from training.config import LoopConfig, PretrainConfig, RLPMidtrainConfig, WandbConfig
from training.data import prepare_data
from training.metrics import replace_text
from training.trainer import run_pretraining


def stage_config(cfg: RLPMidtrainConfig, run_name: str, run_dir: Path, resume: bool, steps: int, lr: float,
                 batch_size: int, eval_every: int, save_every: int, augment: str, base: str = "") -> PretrainConfig:
    """A pretraining run inside the RLP run's directory, with the RLP run's model, data and optimiser
    settings except those a stage sets."""
    return PretrainConfig(
        run_name=run_name, out_dir=str(run_dir), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, resume=resume,
        base=base, model=cfg.model, ttt=cfg.ttt, data=dataclasses.replace(cfg.data, augment=augment),
        optim=dataclasses.replace(cfg.optim, lr=lr, end_lr=lr / 100, warmup_steps=min(30, steps)),
        train=LoopConfig(steps=steps, batch_size=batch_size, eval_every=eval_every, save_every=min(save_every, steps),
                         eval_windows=cfg.train.eval_windows, log_every=10),
        wandb=WandbConfig(mode="disabled"),
    )


def stage_progress(stage_dir: Path, steps: int) -> tuple[bool, Path | None]:
    """(whether the stage in stage_dir ran all its steps and left a whole model, the checkpoint to
    continue from). A finished stage whose model is unusable starts again from its beginning."""
    last = latest_checkpoint(stage_dir)
    if last is None or checkpoint_step(last) < steps:
        return False, last
    try:
        check_model_dir(stage_dir / "model")
        return True, last
    except ValueError as e:
        print(f"the model made earlier in {stage_dir} is unusable ({e}): training it again")
        return False, None


def pretrain_base(cfg: RLPMidtrainConfig, data, run_dir: Path, device) -> Path:
    """A briefly pretrained base model (`pretrain.*`), in <run>/base."""
    base_dir, p = run_dir / "base", cfg.pretrain
    done, last = stage_progress(base_dir, p.steps)
    if done:
        print(f"using the base model pretrained earlier in {base_dir}")
        return base_dir / "model"
    print(f"no base model given: pretraining {cfg.model.name} ({cfg.model.mode}) for {p.steps} steps"
          + (f", from step {checkpoint_step(last)}" if last is not None else "")
          + (" on documents with worked solutions as thoughts (pretrain.augment=think), so the policy can think"
             if p.augment == "think" else f" (pretrain.augment={p.augment})"))
    if p.augment != cfg.data.augment:  # the same corpus, split and tokenizer; thoughts in the train documents
        data = prepare_data(dataclasses.replace(cfg.data, augment=p.augment,
                                                tokenizer=cfg.data.tokenizer or str(run_dir / "tokenizer")),
                            run_dir, cfg.seed)
    pre = stage_config(cfg, "base", run_dir, last is not None, p.steps, p.lr, p.batch_size, p.eval_every,
                       p.save_every, p.augment)
    run_pretraining(pre, data, base_dir, device)
    return base_dir / "model"


def format_warmup(cfg: RLPMidtrainConfig, data, base: Path, run_dir: Path, device) -> Path:
    """The given base trained `warmup.steps` steps on the think-augmented corpus in its own tokenizer
    (<run>/warmup: model/ with tokenizer/ beside it, a base for any pipeline), its thinking probed
    before and after (<run>/warmup/thinking.json)."""
    w, out = cfg.warmup, run_dir / "warmup"
    record_path = out / "thinking.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    done, last = stage_progress(out, w.steps)
    if done and "after" in record:
        print(f"using the format warm-up made earlier in {out}")
        return out / "model"
    if "before" not in record:
        record = {"steps": w.steps, "before": probe_thinking(cfg, base, data.heldout_windows, device)}
        replace_text(record_path, json.dumps(record, indent=1))
    print(f"format warm-up: {base} for {w.steps} steps on documents with worked solutions as thoughts "
          f"(data.augment=think){f', from step {checkpoint_step(last)}' if last is not None else ''}; "
          f"before it: {describe(record['before'])}")
    think_data = prepare_data(dataclasses.replace(cfg.data, augment="think"), run_dir, cfg.seed)
    pre = stage_config(cfg, "warmup", run_dir, last is not None, w.steps, w.lr, w.batch_size, w.eval_every,
                       w.save_every, "think", base=str(base))
    run_pretraining(pre, think_data, out, device)
    data.tokenizer.save_pretrained(out / "tokenizer")  # beside model/, where base=<run>/warmup/model looks
    record["after"] = probe_thinking(cfg, out / "model", data.heldout_windows, device)
    replace_text(record_path, json.dumps(record, indent=1))
    print(f"format warm-up done: thinking before {describe(record['before'])}; after {describe(record['after'])}")
    if record["after"]["closed_frac"] < w.target_closed_frac:
        print(f"WARNING: after the format warm-up the policy closes {record['after']['closed_frac']:.0%} of its "
              f"thoughts, below warmup.target_closed_frac={w.target_closed_frac}; give more warmup.steps")
    return out / "model"


def probe_thinking(cfg: RLPMidtrainConfig, model_dir: Path, windows: torch.Tensor, device) -> dict[str, float]:
    """How the model thinks in RLP's format, on `warmup.probe_windows` held-out windows: one position
    each, G thoughts of up to rlp.thought_max_tokens tokens sampled as RLP samples them (torch engine),
    the share it closes itself and their information gain (reward rlp_info_gain, teacher = itself)."""
    threads = torch.get_num_threads()  # a worker decodes on one thread; the training here uses them all
    worker = RolloutWorker(str(model_dir), cfg.data.tokenizer, cfg.rlp, "rlp_info_gain", cfg.seed * 1000 + 999,
                           str(device))
    try:
        groups = [worker.rollout(w[None]) for w in windows[: cfg.warmup.probe_windows]]  # a position per window
    finally:
        torch.set_num_threads(threads)
    thoughts = sum(g.positions for g in groups) * cfg.rlp.group_size
    gains = [r for g in groups for r in g.rewards]
    return {"closed_frac": sum(g.closed for g in groups) / thoughts,
            "info_gain": sum(gains) / len(gains) if gains else math.nan,
            "positive_frac": sum(r > 0 for r in gains) / len(gains) if gains else math.nan,
            "thought_tokens": sum(g.thought_tokens for g in groups) / thoughts, "thoughts": thoughts}


def describe(probe: dict[str, float]) -> str:
    return (f"closed {probe['closed_frac']:.2f}, mean information gain {probe['info_gain']:+.3f} nats "
            f"({probe['positive_frac']:.0%} positive), {probe['thought_tokens']:.1f} tokens per thought")
