"""Data efficiency, measured: several methods trained on the same corpus, seed, tokenizer and
data-token budget, each a run of its own pipeline, evaluated on the same held-out documents.

    python pipelines/compare.py                                   # ntp_plain, ntp_ttt, tpt, rlp (CPU)
    python pipelines/compare.py methods=[ntp_plain,rlp] budget_tokens=1000000 model=125m
    python pipelines/report.py runs/compare                       # the dashboard

Methods:
  ntp_plain  next-token pretraining of the plain transformer (full attention)
  ntp_ttt    next-token pretraining of TTT-E2E (meta-learning)
  tpt        TTT-E2E on thinking-augmented documents [d ; <think> t </think>], t the worked solution
             the embedded corpus carries (its thinking tokens are counted apart, not as data)
  rlp        TTT-E2E pretrained on (1 - rlp_fraction) of the budget, then RLP on the rest
Every run logs tokens/data, tokens/thought and flops/total at each evaluation; runs land in
<out_dir>/<method>/.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipelines.rlp_midtrain as rlp_midtrain  # noqa: E402
import pipelines.ttt_pretrain as ttt_pretrain  # noqa: E402
from training.config import CONFIG_DIR, CompareConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.run import parse_config_or_exit  # noqa: E402


def method_overrides(cfg: CompareConfig, method: str, tokenizer_dir: Path) -> tuple[object, list[str]]:
    """The pipeline that runs `method` and its key=value overrides."""
    steps = max(1, math.ceil(cfg.budget_tokens / (cfg.batch_size * cfg.data.seq_len)))  # as the trainer counts
    every = max(1, steps // cfg.eval_points)
    shared = {**{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
              **{f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()}, "data.tokenizer": tokenizer_dir}
    common = [f"out_dir={cfg.out_dir}", f"run_name={method}", f"seed={cfg.seed}",
              *(f"{k}={v}" for k, v in shared.items() if v is not None),
              f"train.task_problems={cfg.task_problems}", f"wandb.mode={cfg.wandb.mode}"]
    pretrain = [*common, f"train.data_tokens={cfg.budget_tokens}", f"train.batch_size={cfg.batch_size}",
                f"train.eval_every={every}", f"train.save_every={steps}", "optim.warmup_steps=30"]
    if method == "ntp_plain":
        return ttt_pretrain, [*pretrain, "model.mode=full"]
    if method == "ntp_ttt":
        return ttt_pretrain, [*pretrain, "model.mode=ttt_e2e"]
    if method == "tpt":
        return ttt_pretrain, [*pretrain, "model.mode=ttt_e2e", "data.augment=tpt"]
    rlp_tokens = int(cfg.budget_tokens * cfg.rlp_fraction)
    base_steps = max(1, (cfg.budget_tokens - rlp_tokens) // (cfg.batch_size * cfg.data.seq_len))
    windows = 16
    rlp_steps = max(1, rlp_tokens // (windows * cfg.data.seq_len))
    return rlp_midtrain, [
        *common, "model.mode=ttt_e2e", f"pretrain.steps={base_steps}", f"pretrain.batch_size={cfg.batch_size}",
        f"pretrain.eval_every={max(1, base_steps // cfg.eval_points)}", f"train.data_tokens={rlp_tokens}",
        f"rollout.windows_per_step={windows}", f"train.eval_every={max(1, rlp_steps // 2)}",
        f"train.save_every={rlp_steps}", "train.log_every=1", "optim.warmup_steps=1",
    ]


def main(argv: list[str]) -> dict[str, dict]:
    cfg = parse_config_or_exit(CompareConfig, CONFIG_DIR / "compare.yaml", argv)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One tokenizer for every method, trained once on the shared train split.
    prepare_data(cfg.data, out, cfg.seed)
    summaries = {}
    for i, method in enumerate(cfg.methods, 1):
        pipeline, overrides = method_overrides(cfg, method, (out / "tokenizer").resolve())
        print(f"\n=== [{i}/{len(cfg.methods)}] {method}: {pipeline.__name__.split('.')[-1]} {' '.join(overrides)}")
        summaries[method] = pipeline.main(overrides)
    print(f"\nruns in {out}/<method>/; the dashboard: python pipelines/report.py {out}")
    for method, s in summaries.items():
        print(f"{method:>10}: held-out bpb {s['eval/bpb']:.4f}  data tokens {s.get('tokens/data', 0):,.0f}")
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
