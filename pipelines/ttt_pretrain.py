"""Next-token pretraining of a Ponder model (plain, sliding-window or TTT-E2E meta-learning) on the
embedded corpus or your own files.

    python pipelines/ttt_pretrain.py                      # tiny model, embedded corpus, CPU
    python pipelines/ttt_pretrain.py model.mode=ttt_e2e   # TTT-E2E meta-learning
    python pipelines/ttt_pretrain.py model=125m data=files data.source=docs.jsonl train.steps=5000
    python pipelines/ttt_pretrain.py run_name=my_run resume=true    # continue a killed run
    python pipelines/ttt_pretrain.py base=runs/llama_ttt optim.lr=3e-4   # bridge a converted model (convert_hf.py)

Outputs in runs/<run_name>/: config.yaml, tokenizer/, model/ (save_pretrained), checkpoints/,
metrics.jsonl and wandb/ (offline unless wandb.mode=online).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a Ray working_dir

import torch  # noqa: E402

from training.config import CONFIG_DIR, PretrainConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.preflight import check_data_files, check_ponder_base, check_tokenizer_fits, with_base_tokenizer  # noqa: E402
from training.cluster import driver_threads  # noqa: E402
from training.run import (config_errors_exit, outputs_line, parse_config_or_exit, prepare_run_dir,  # noqa: E402
                          resolve_device, storage_errors_exit)
from training.trainer import run_pretraining  # noqa: E402


def main(argv: list[str]) -> dict[str, float]:
    cfg = parse_config_or_exit(PretrainConfig, CONFIG_DIR / "ttt_pretrain.yaml", argv)
    driver_threads()
    torch.manual_seed(cfg.seed)
    with config_errors_exit():  # bad inputs named in one line, before any training
        check_data_files(cfg.data)
        if cfg.base:
            cfg.base = str(Path(cfg.base).expanduser().resolve())
            check_ponder_base(Path(cfg.base))
            cfg = with_base_tokenizer(cfg, Path(cfg.base))  # the base's own tokenizer
        run_dir = prepare_run_dir(cfg)
        data = prepare_data(cfg.data, run_dir, cfg.seed)
        if cfg.base:
            check_tokenizer_fits(Path(cfg.base), data.tokenizer, think_tokens=False)
            if not (run_dir / "tokenizer").exists():  # beside model/, where rlp_midtrain base=<run>/model looks
                data.tokenizer.save_pretrained(run_dir / "tokenizer")
    summary = run_pretraining(cfg, data, run_dir, resolve_device(cfg.device))
    print(outputs_line(run_dir))
    return summary


if __name__ == "__main__":
    with storage_errors_exit():  # a full disk, a permission: one line naming the path and the errno
        main(sys.argv[1:])
