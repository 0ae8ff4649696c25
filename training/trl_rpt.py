"""The RPT setup run through TRL's GRPOTrainer: the baseline Ponder's Ray graph is measured against
(bench/rpt_vs_trl.py).

The same as pipelines/rpt_train.py wherever TRL lets it be: prompts are contexts x_<t followed by
<think> at positions the proxy's top-k entropy keeps; G responses at the same temperature, up to
the eos token or rpt.response_max_tokens; the project's prefix-match reward as `reward_funcs`;
group advantages r - mean(r) without std scaling; each response's token mean of the clipped
surrogate (loss_type "grpo"); exactly on-policy (one iteration per generation), KL 0; the
project's AdamW (decay on matrices only) at a constant lr, gradients clipped alike.
Ponder's advantage carries a factor G/(G-1) more (leave-one-out); Adam's update does not see a
constant factor on the loss, so the steps agree.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from rewards import rpt_prefix_match_trl
from rollout.rpt import choose_contexts
from rollout.tokens import token_bytes
from training.optim import build_optimizer


def rpt_prompts(tokenizer, proxy, windows: torch.Tensor, rpt_cfg, rlp_cfg, seed: int):
    """A `datasets.Dataset` of RPT prompts from windows, chosen as RPTWorker chooses them: columns
    prompt (text of x_<t and <think>) and target_token_texts (the bytes of each true next token)."""
    from datasets import Dataset

    think_open = tokenizer.convert_tokens_to_ids("<think>")
    contexts, targets = choose_contexts(proxy, windows, rpt_cfg, rlp_cfg, torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"prompt": [tokenizer.decode(c + [think_open]) for c in contexts],
                              "target_token_texts": [token_bytes(tokenizer, t) for t in targets]})


def grpo_config(cfg, out_dir: str | Path, steps: int, prompts_per_step: int):
    """GRPOConfig with the settings of an RPTTrainConfig `cfg`, on the CPU unless a GPU is there."""
    from trl import GRPOConfig

    g, rlp = cfg.rlp.group_size, cfg.rlp
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=prompts_per_step * g,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=g,
        temperature=rlp.temperature, top_p=rlp.top_p, top_k=0, max_completion_length=cfg.rpt.response_max_tokens,
        beta=0.0, epsilon=rlp.clip_low, epsilon_high=rlp.clip_high, scale_rewards="none", loss_type="grpo",
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=cfg.optim.grad_clip,
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, seed=cfg.seed, shuffle_dataset=False,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )


class StepTimes(TrainerCallback):
    """The wall time of every optimizer step (generation included)."""

    def __init__(self):
        self.times: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def train_trl(cfg, model, tokenizer, dataset, steps: int, out_dir: str | Path):
    """`steps` GRPO steps of TRL on `model` (a Hugging Face causal LM, trained in place). Returns
    (the trainer's per-step logs, the wall seconds of every step)."""
    from trl import GRPOTrainer

    prompts_per_step = cfg.rollout.windows_per_step * cfg.rlp.positions_per_window
    tokenizer.padding_side = "left"  # prompts are left-padded for generation
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=rpt_prefix_match_trl, args=grpo_config(cfg, out_dir, steps, prompts_per_step),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer],
                          optimizers=(build_optimizer(model, cfg.optim), None))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, timer.times
