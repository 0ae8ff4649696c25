"""Next-token pretraining of a Ponder model on the embedded corpus or your own files.

    python pipelines/ttt_pretrain.py                      # tiny model, embedded corpus, CPU
    python pipelines/ttt_pretrain.py model=125m data=files data.source=docs.jsonl train.steps=5000
    python pipelines/ttt_pretrain.py run_name=my_run resume=true    # continue a killed run

Outputs in runs/<run_name>/: config.yaml, tokenizer/, model/ (save_pretrained), checkpoints/,
metrics.jsonl and wandb/ (offline unless wandb.mode=online).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a Ray working_dir

import torch  # noqa: E402

from training.config import CONFIG_DIR, PretrainConfig  # noqa: E402
from training.data import WindowLoader, prepare_data  # noqa: E402
from training.metrics import MetricsLogger  # noqa: E402
from training.run import build_model, parse_config_or_exit, prepare_run_dir, resolve_device  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def main(argv: list[str]) -> dict[str, float]:
    cfg = parse_config_or_exit(PretrainConfig, CONFIG_DIR / "ttt_pretrain.yaml", argv)
    torch.manual_seed(cfg.seed)
    run_dir = prepare_run_dir(cfg)
    device = resolve_device(cfg.device)

    data = prepare_data(cfg.data, run_dir, cfg.seed)
    model = build_model(cfg.model, data.tokenizer, cfg.ttt)
    print(f"model: {cfg.model.name} ({cfg.model.mode}), {model.num_params() / 1e6:.2f}M parameters; "
          f"data: {len(data.train_windows)} train / {len(data.heldout_windows)} held-out windows of "
          f"{cfg.data.seq_len} tokens; device: {device}")

    loader = WindowLoader(data.train_windows, cfg.train.batch_size, cfg.seed)
    trainer = Trainer(cfg, model, loader, data.heldout_windows, data.token_bytes, run_dir, device,
                      extra_metrics={"data/docs_skipped": data.docs_skipped})
    resumed_at = trainer.maybe_resume() if cfg.resume else None
    if resumed_at is not None:
        print(f"resumed {run_dir} at step {resumed_at}")
    logger = MetricsLogger(run_dir, config=dataclasses.asdict(cfg), wandb_mode=cfg.wandb.mode, project=cfg.wandb.project,
                           entity=cfg.wandb.entity, run_name=cfg.run_name, resume_step=resumed_at)
    try:
        summary = trainer.fit(logger)
    finally:
        logger.close()
    print(f"outputs in {run_dir}/: model/ (from_pretrained), checkpoints/, metrics.jsonl, tokenizer/, wandb/")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
