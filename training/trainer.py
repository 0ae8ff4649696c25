"""The pretraining Trainer: `train_step` on one batch of token windows, periodic held-out
evaluation, atomic checkpoints and resume, metrics to metrics.jsonl and wandb.

With ttt.carry_backprop_windows = K every batch row is K consecutive windows of a stream whose
state the trainer carries from step to step (training/carry.py, truncated backprop through time).

Each step of `fit` is a flat sequence of named, timed phases (train, eval, save) whose seconds
are logged as timing_s/<phase>.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.hf import flops_per_token, is_ponder, is_ttt, next_token_loss
from training.checkpoint import (load_latest_checkpoint, rng_state, save_checkpoint, save_model, set_rng_state,
                                 writing)
from training.carry import CarriedState
from training.config import ConfigError, PretrainConfig, check_carry_backprop
from training.cuda_graph import GraphedStep
from training.data import PreparedData, WindowLoader, split_window
from training.evaluate import TaskAccuracy, heldout_bpb
from training.metrics import MetricsLogger, base_counters, first_bpb, read_metrics
from training.optim import build_optimizer, steps_for_tokens, warmup_cosine
from training.run import build_model, load_base


def inner_loss_first_last(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> dict[str, float]:
    """Masked mean loss of the first chunk (predicted by W_0) and of the last full one (by the
    most adapted fast weights): their gap is what the inner loop gains within a window (carrying
    state: within the step's K windows, whose first chunk starts from W_0 only at a stream's start)."""
    with torch.no_grad():
        tok = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                              reduction="none").view(targets.shape)
        valid = (targets != -100).float()
        last = (targets.shape[1] // chunk - 1) * chunk

        def mean(span: slice) -> float:
            return ((tok[:, span] * valid[:, span]).sum() / valid[:, span].sum().clamp(min=1)).item()

        return {"ttt/inner_loss_first": mean(slice(0, chunk)), "ttt/inner_loss_last": mean(slice(last, last + chunk))}


@contextmanager
def timed(timings: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    timings[f"timing_s/{phase}"] = timings.get(f"timing_s/{phase}", 0.0) + time.perf_counter() - start


class Trainer:
    def __init__(self, cfg: PretrainConfig, model: torch.nn.Module, loader: WindowLoader,
                 heldout_windows: torch.Tensor, token_bytes: torch.Tensor, run_dir: str | Path,
                 device: torch.device, extra_metrics: dict[str, float] | None = None,
                 task_eval: TaskAccuracy | None = None, prior_counters: dict[str, float] | None = None):
        """prior_counters: tokens/data and flops/total its base model cost (training.metrics.base_counters),
        added to this run's own in every record."""
        self.cfg, self.model, self.loader = cfg, model.to(device), loader
        self.heldout_windows = heldout_windows[: cfg.train.eval_windows]
        self.token_bytes, self.run_dir, self.device = token_bytes, Path(run_dir), device
        self.extra_metrics = extra_metrics or {}
        self.task_eval = task_eval
        self.optimizer = build_optimizer(model, cfg.optim)
        self.step = 0  # optimiser steps taken
        self.tokens_data = 0  # corpus tokens the model has trained on
        self.tokens_thought = 0  # thinking tokens it trained on (TPT)
        self.skipped_steps = 0  # non-finite losses
        self.consecutive_skips = 0
        self.prior = prior_counters or {}
        self.flops_per_token = flops_per_token(model, loader.seq_len)
        self.is_ttt = is_ttt(model)  # a Ponder TTT-E2E model; Ponder's other modes and Hugging Face causal LMs train too
        fast = {id(p) for block in model.blocks for level in block.fast_levels() for p in level.parameters()} \
            if self.is_ttt else set()
        self.slow_params = [p for p in model.parameters() if id(p) not in fast]  # all but the fast MLPs' W_0
        self.boundary_id = model.config.eos_token_id if cfg.data.mask_boundary_targets else None
        if self.is_ttt:
            self.model.inner_lr = self.inner_lr_at(0)
        self.carried = CarriedState(self.model, self.boundary_id) if cfg.ttt.carry_backprop_windows else None
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        self.graphed = None
        if cfg.train.cuda_graphs:
            unsupported = ("carried state (ttt.carry_backprop_windows) changes the graph every step" if self.carried else
                           None if is_ponder(model) else "the step is captured for Ponder models only")
            self.graphed = GraphedStep(self.graphed_loss, list(self.model.parameters()), unsupported)
            if self.is_ttt and not unsupported and device.type == "cuda":  # a tensor the graph reads, so the warmup of the inner lr reaches replays
                self.model.inner_lr = torch.tensor(float(self.model.inner_lr), device=device)

    # ---------------------------------------------------------------------------------- steps
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return warmup_cosine(step, lr=o.lr, end_lr=o.end_lr, warmup_steps=o.warmup_steps, total_steps=self.cfg.train.steps)

    def inner_lr_at(self, step: int) -> float:
        """TTT-E2E's inner learning rate: linear from inner_lr_init to inner_lr over the warmup."""
        t = self.cfg.ttt
        warmup = max(1, round(t.inner_lr_warmup * self.cfg.train.steps))
        return t.inner_lr_init + (t.inner_lr - t.inner_lr_init) * min(1.0, (step + 1) / warmup)

    def train_step(self, batch: torch.Tensor, thought_tokens: int = 0, new_streams: bool = True) -> dict[str, float]:
        """One optimiser step on a [B, T+1] batch of windows, `thought_tokens` of whose targets
        are appended thinking (TPT). A non-finite loss skips the step. Carrying state: a [B, K, T+1]
        batch, the next K windows of every row's stream (new_streams: the first of new streams)."""
        batch = batch.to(self.device, non_blocking=True)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        extra = {}
        if self.is_ttt:
            extra["ttt/ilr"] = self.inner_lr_at(self.step)
            if isinstance(self.model.inner_lr, torch.Tensor):
                self.model.inner_lr.fill_(extra["ttt/ilr"])
            else:
                self.model.inner_lr = extra["ttt/ilr"]
        if self.graphed is not None and self.graphed.eager_reason is None:
            (loss, logits), targets = self.graphed(batch), split_window(batch, self.boundary_id)[1]
        else:
            with self.autocast:
                loss, logits, targets = self.forward(batch, new_streams)
        if self.is_ttt:
            extra.update(inner_loss_first_last(logits.detach(), targets, self.model.config.mini_batch_size))
        self.tokens_data += batch[..., 1:].numel() - thought_tokens
        self.tokens_thought += thought_tokens
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips > 10:
                raise FloatingPointError(f"loss was not finite for {self.consecutive_skips} steps in a row at step {self.step}; "
                                         "lower optim.lr or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            if self.carried is not None:  # the state is likely no better: the rows read on from a fresh one
                self.carried.reset()
            return {"train/loss": float("nan"), "train/skipped_steps": self.skipped_steps, "skipped": True}
        if loss.requires_grad:  # the graphed step has run its backward already
            loss.backward()
        if self.step < self.cfg.ttt.freeze_slow_steps:  # AdamW leaves a parameter without a gradient alone
            for p in self.slow_params:
                p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.carried is not None:
            self.carried.truncate()
        self.step += 1
        self.consecutive_skips = 0
        return {"train/loss": loss.item(), "train/grad_norm": grad_norm.item(), "train/lr": lr,
                "train/skipped_steps": self.skipped_steps, **extra}

    def forward(self, batch: torch.Tensor, new_streams: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training loss of a batch, its logits and targets."""
        if self.carried is not None:
            if new_streams:
                self.carried.reset()
            return self.carried.loss(batch)
        inputs, targets = split_window(batch, self.boundary_id)
        if not is_ponder(self.model):  # a Hugging Face causal LM: no inner loop, so no logits needed
            return next_token_loss(self.model, inputs, targets), None, targets
        out = self.model(inputs, targets=targets)
        return out.loss, out.logits, targets

    def graphed_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and logits of a batch, as GraphedStep captures them (autocast's cast cache would
        keep casts from the capture that replays never refresh)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16",
                            cache_enabled=False):
            inputs, targets = split_window(batch, self.boundary_id)
            out = self.model(inputs, targets=targets)
        return out.loss, out.logits

    def evaluate(self) -> dict[str, float]:
        with self.autocast:
            metrics = heldout_bpb(self.model, self.heldout_windows, self.token_bytes, self.cfg.train.batch_size, self.device,
                                  boundary_id=self.boundary_id, carry_state=self.cfg.ttt.carry_state)
            if self.task_eval is not None:
                metrics.update(self.task_eval(self.model))
        return metrics

    # ------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "step": self.step, "tokens_data": self.tokens_data, "tokens_thought": self.tokens_thought,
            "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(), "rng": rng_state(),
            "carried": self.carried.state_dict() if self.carried is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if self.carried is not None:
            self.carried.load_state_dict(state.get("carried"), self.device)
        self.step, self.tokens_data, self.skipped_steps = state["step"], state["tokens_data"], state["skipped_steps"]
        self.tokens_thought, self.consecutive_skips = state["tokens_thought"], state.get("consecutive_skips", 0)

    def save(self) -> Path:
        with writing(self.run_dir / "checkpoints"):
            path = save_checkpoint(self.run_dir, self.step, self.state_dict())
        with writing(self.run_dir / "model"):
            save_model(self.model, self.run_dir / "model")  # the latest weights, for from_pretrained
        return path

    def maybe_resume(self) -> int | None:
        """Load the newest checkpoint of this run if there is one; returns its step."""
        found = load_latest_checkpoint(self.run_dir)
        if found is None:
            return None
        self.load_state_dict(found[1])
        return self.step

    # ------------------------------------------------------------------------------------- loop
    def counters(self) -> dict[str, float]:
        trained = self.tokens_data + self.tokens_thought
        return {"tokens/data": self.prior.get("tokens/data", 0) + self.tokens_data, "tokens/thought": self.tokens_thought,
                "flops/total": self.prior.get("flops/total", 0.0) + self.flops_per_token * trained}

    def fit(self, logger: MetricsLogger) -> dict[str, float]:
        t = self.cfg.train
        first = {**self.evaluate(), **self.counters()}
        if self.step == 0:
            logger.log({**first, **self.extra_metrics}, step=0)
        tqdm.write(f"step {self.step}: held-out bpb {first['eval/bpb']:.4f}")
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last_eval = first
        while self.step < t.steps:
            timings: dict[str, float] = {}
            with timed(timings, "train"):
                batch = self.loader.next_batch()
                metrics = self.train_step(batch, self.loader.last_thought_tokens, self.loader.starts_streams)
            if metrics.pop("skipped", False):
                tqdm.write(f"step {self.step}: loss not finite, step skipped ({self.skipped_steps} so far)")
                continue
            metrics["perf/learner_tokens_per_s"] = self.loader.tokens_per_batch / timings["timing_s/train"]
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", bpb=f"{last_eval['eval/bpb']:.3f}")
            done = self.step >= t.steps
            if self.step % t.eval_every == 0 or done:
                with timed(timings, "eval"):
                    last_eval = self.evaluate()
                metrics.update(last_eval)
            if self.step % t.log_every == 0 or "eval/bpb" in metrics or done:
                logger.log({**metrics, **timings, **self.counters()}, step=self.step)
            if self.step % t.save_every == 0 or done:  # after the step's record: both survive a kill
                logger.sync()
                self.save()
        bar.close()
        start_bpb = first_bpb(read_metrics(logger.path)) or first["eval/bpb"]  # a resumed run's start is its step 0
        tqdm.write(f"step {self.step}: held-out bpb {last_eval['eval/bpb']:.4f} (start {start_bpb:.4f})")
        return {"bpb_start": start_bpb, **last_eval, **self.counters()}


def run_pretraining(cfg: PretrainConfig, data: PreparedData, run_dir: Path, device: torch.device) -> dict[str, float]:
    """Build the model and train it as `cfg` says (resuming when cfg.resume); returns the summary."""
    if cfg.train.data_tokens:
        cfg = with_data_token_budget(cfg, data)
    model = load_base(cfg.base, cfg.ttt) if cfg.base else build_model(cfg.model, data.tokenizer, cfg.ttt)
    mode = model.config.mode if is_ponder(model) else model.config.model_type
    check_carry_backprop(cfg.ttt, mode)
    name = f"base {cfg.base}" if cfg.base else cfg.model.name
    print(f"model: {name} ({mode}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"data: {len(data.train_windows)} train / {len(data.heldout_windows)} held-out windows of "
          f"{cfg.data.seq_len} tokens; device: {device}")
    try:
        loader = WindowLoader(data.train_windows, cfg.train.batch_size, cfg.seed, thought_mask=data.train_thought_mask,
                              stream_windows=cfg.ttt.carry_stream_windows if cfg.ttt.carry_backprop_windows else 0,
                              windows_per_step=cfg.ttt.windows_per_step)
    except ValueError as e:
        raise ConfigError(f"train.batch_size: {e}; lower it (or ttt.carry_stream_windows) or give more data") from None
    task_eval = None
    if cfg.train.task_problems:
        task_eval = TaskAccuracy(data.tokenizer, data.heldout_docs, cfg.train.task_problems, cfg.train.task_max_new_tokens,
                                 think_tokens=cfg.train.task_think_tokens)
    trainer = Trainer(cfg, model, loader, data.heldout_windows, data.token_bytes, run_dir, device,
                      extra_metrics={"data/docs_skipped": data.docs_skipped}, task_eval=task_eval,
                      prior_counters=base_counters(cfg.base) if cfg.base else None)
    resumed_at = trainer.maybe_resume() if cfg.resume else None
    if resumed_at is not None:
        print(f"resumed {run_dir} at step {resumed_at}")
    logger = MetricsLogger(run_dir, config=dataclasses.asdict(cfg), wandb_mode=cfg.wandb.mode, project=cfg.wandb.project,
                           entity=cfg.wandb.entity, run_name=cfg.run_name, resume_step=resumed_at)
    try:
        return trainer.fit(logger)
    finally:
        logger.close()


def with_data_token_budget(cfg: PretrainConfig, data: PreparedData) -> PretrainConfig:
    """cfg with train.steps set so the run consumes train.data_tokens corpus tokens (a TPT
    window holds fewer of them: its appended thinking is counted apart)."""
    thought_frac = 0.0 if data.train_thought_mask is None else data.train_thought_mask[:, 1:].float().mean().item()
    per_step = cfg.train.batch_size * cfg.ttt.windows_per_step * cfg.data.seq_len * (1 - thought_frac)
    steps = steps_for_tokens(cfg.train.data_tokens, per_step)
    optim = dataclasses.replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps), optim=optim)
