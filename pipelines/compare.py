"""Data efficiency, measured: several methods trained on the same corpus, seed, tokenizer and
data-token budget, each a run of its own pipeline, evaluated on the same held-out documents and
problems (with and without a thought).

    python pipelines/compare.py                                   # every method below (CPU)
    python pipelines/compare.py methods=[cpt,rlp] rlp.group_size=8 rlp.position_sampling=entropy
    python pipelines/report.py runs/compare                       # the dashboard

Methods, from scratch on the whole budget:
  ntp_plain  next-token pretraining of the plain transformer (full attention)
  ntp_ttt    next-token pretraining of TTT-E2E (meta-learning)
  tpt        TTT-E2E on thinking-augmented documents [d ; <think> t </think>] (thinking counted apart)
  ttt_warm   warm start (methods.md §7): a plain Llama-shaped transformer (base_llama) pretrained on
             (1 - warm_fraction) of the budget, converted to TTT-E2E, bridged on the rest; its curve
             counts the plain pretraining's tokens
RLP's comparison (methods.md §1): one base per backbone, made once per compare on (1 - rlp_fraction)
of the budget with worked solutions as thoughts (data.augment=think, so it can think), then from
that SAME base, on the same windows in the same order with the same optimiser and lr:
  cpt        continued pretraining: the next-token term alone
  rlp        the next-token term plus RLP (rlp.*, reward)
  rlp_plain  rlp on the plain transformer's base: what TTT-E2E adds to RLP
  rlp_pure   the RLP paper's objective: the RLP term alone (rlp.ttt_weight=0)
  cpt_flops  cpt given rlp's FLOPs, by reading further into the same stream of windows (needs the
             cpt and rlp runs of the same out_dir, which run first)
Several seeds, each its own corpus draw and base, in <out_dir>/seed_<s>/, then every metric as the
mean with its 95% interval over seeds and the paired tests (training/seed_grid.py):
    python pipelines/compare.py seeds=[0,1,2] methods=[cpt,rlp,rlp_pure,cpt_flops] budget_tokens=1200000
Runs land in <out_dir>/<method>[_<tag>]/, bases in <out_dir>/base_{ttt,plain,llama}/, made
once and reused by later compares into the same out_dir: an ablation is one more compare, e.g.
    python pipelines/compare.py methods=[rlp] tag=g8 rlp.group_size=8
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import seed_grid  # noqa: E402
from training.config import CONFIG_DIR, CompareConfig, ConfigError, TTTConfig  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.evaluate import TaskAccuracy  # noqa: E402
from training.metrics import base_counters, read_metrics, run_summary  # noqa: E402
from training.optim import steps_for_tokens  # noqa: E402
from training.run import config_errors_exit, export_llama, load_base, parse_config_or_exit  # noqa: E402


FROM_BASE = {"cpt": "base_ttt", "rlp": "base_ttt", "rlp_plain": "base_plain", "ttt_warm": "base_llama",
             "rlp_pure": "base_ttt", "cpt_flops": "base_ttt"}
PLAIN_LLAMA = ["model.mode=full", "model.post_norm=false", "model.qk_norm=false"]  # what convert_hf reads
PIPELINES = Path(__file__).resolve().parent


def run_pipeline(name: str, overrides: list[str]) -> None:
    """pipelines/<name>.py with key=value overrides, in a process of its own (its own Ray, its own
    memory); a failure stops the comparison with the pipeline's exit status."""
    done = subprocess.run([sys.executable, str(PIPELINES / f"{name}.py"), *overrides])
    if done.returncode:
        print(f"error: {name} exited with status {done.returncode} (its output is above); the runs that finished "
              "are kept and reused by the same command", file=sys.stderr)
        raise SystemExit(done.returncode)


def method_overrides(cfg: CompareConfig, method: str, tokenizer_dir: Path) -> tuple[str, list[str]]:
    """The pipeline that runs `method` (or makes a base) and its key=value overrides."""
    shared = {**{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
              **{f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()}, "data.tokenizer": tokenizer_dir}
    common = [f"out_dir={cfg.out_dir}", f"run_name={run_name(cfg, method)}", f"seed={cfg.seed}",
              *(f"{k}={_value(v)}" for k, v in shared.items() if v is not None),
              f"train.task_problems={cfg.task_problems}", f"wandb.mode={cfg.wandb.mode}"]
    think = f"train.task_think_tokens={cfg.rlp.thought_max_tokens}"  # pretraining's; RLP reads rlp.thought_max_tokens
    mid_tokens = int(cfg.budget_tokens * cfg.rlp_fraction)
    bridge_tokens = int(cfg.budget_tokens * cfg.warm_fraction)
    if method == "ttt_warm":
        steps = steps_for_tokens(bridge_tokens, cfg.batch_size * cfg.data.seq_len)
        return "ttt_pretrain", [*common, think, f"base={converted(cfg)}", f"train.data_tokens={bridge_tokens}",
                              f"train.batch_size={cfg.batch_size}", f"train.eval_every={max(1, steps // cfg.eval_points)}",
                              f"train.save_every={steps}", f"optim.lr={cfg.warm_lr}", f"optim.end_lr={cfg.warm_lr / 10}",
                              "optim.warmup_steps=3"]
    if method in FROM_BASE:
        if method == "cpt_flops":
            mid_tokens = flops_matched_tokens(cfg)
        steps = steps_for_tokens(mid_tokens, cfg.windows_per_step * cfg.data.seq_len)  # as rlp_midtrain counts
        overrides = [*common, f"base={Path(cfg.out_dir).resolve() / FROM_BASE[method] / 'model'}",
                     f"reward={cfg.reward}", f"train.data_tokens={mid_tokens}",
                     f"rollout.windows_per_step={cfg.windows_per_step}", f"train.eval_every={max(1, steps // cfg.eval_points)}",
                     f"train.save_every={steps}", "train.log_every=1", f"optim.lr={cfg.mid_lr}",
                     f"optim.end_lr={cfg.mid_lr / 10}", "optim.warmup_steps=1",
                     *(f"rlp.{k}={v}" for k, v in dataclasses.asdict(cfg.rlp).items())]
        if method in ("cpt", "cpt_flops"):
            overrides.append("rlp.rlp_weight=0")
        if method == "rlp_pure":
            overrides.append("rlp.ttt_weight=0")
        return "rlp_midtrain", overrides
    budget = {"base_llama": cfg.budget_tokens - bridge_tokens, "base_ttt": cfg.budget_tokens - mid_tokens,
              "base_plain": cfg.budget_tokens - mid_tokens}.get(method, cfg.budget_tokens)
    steps = steps_for_tokens(budget, cfg.batch_size * cfg.data.seq_len)  # as the trainer counts
    pretrain = [*common, think, f"train.data_tokens={budget}", f"train.batch_size={cfg.batch_size}",
                f"train.eval_every={max(1, steps // cfg.eval_points)}", f"train.save_every={steps}",
                "optim.warmup_steps=30", f"optim.lr={cfg.lr}"]
    if method == "base_llama":
        return "ttt_pretrain", [*pretrain, *PLAIN_LLAMA, "data.augment=none"]
    mode = "full" if method in ("ntp_plain", "base_plain") else "ttt_e2e"
    augment = {"tpt": "tpt", "base_ttt": "think", "base_plain": "think"}.get(method, "none")
    return "ttt_pretrain", [*pretrain, f"model.mode={mode}", f"data.augment={augment}"]


def run_name(cfg: CompareConfig, method: str) -> str:
    return f"{method}_{cfg.tag}" if cfg.tag and not method.startswith("base_") else method


def flops_matched_tokens(cfg: CompareConfig) -> int:
    """The data tokens that give CPT the FLOPs rlp spent after the base: rlp's phase FLOPs over
    CPT's FLOPs per data token, both as the learner counts them (flops/total)."""
    out = Path(cfg.out_dir).resolve()
    base = base_counters(out / "base_ttt" / "model")
    spent = {}
    for method in ("cpt", "rlp"):
        metrics = out / run_name(cfg, method) / "metrics.jsonl"
        if not metrics.is_file():
            raise ConfigError(f"cpt_flops needs the finished {run_name(cfg, method)} run in {out}: "
                              "put cpt and rlp in methods (they run first)")
        last = read_metrics(metrics)[-1]
        spent[method] = (last["tokens/data"] - base.get("tokens/data", 0), last["flops/total"] - base.get("flops/total", 0.0))
    (cpt_tokens, cpt_flops), (_, rlp_flops) = spent["cpt"], spent["rlp"]
    return math.ceil(rlp_flops * cpt_tokens / cpt_flops)


def converted(cfg: CompareConfig) -> Path:
    return Path(cfg.out_dir).resolve() / "base_llama" / "converted"


def convert_base_llama(cfg: CompareConfig) -> None:
    """base_llama as TTT-E2E with the compare's window, chunk and suffix (ntp_ttt's shape)."""
    m = cfg.model
    out = Path(cfg.out_dir).resolve()
    llama = export_llama(out / "base_llama", out / "tokenizer")
    run_pipeline("convert_hf", [f"source={llama}", f"out={converted(cfg)}",
                                *(f"model.{k}={getattr(m, k)}" for k in ("suffix_len", "sliding_window", "mini_batch_size")
                                  if getattr(m, k) is not None)])


def _value(v) -> str:
    return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)


def run_order(methods: list[str]) -> list[str]:
    """The bases the chosen methods start from, first, then the methods, cpt_flops after the runs
    whose FLOPs it matches."""
    bases = [b for b in ("base_ttt", "base_plain", "base_llama") if any(FROM_BASE.get(m) == b for m in methods)]
    return bases + sorted(methods, key=lambda m: m == "cpt_flops")


def think_eval(cfg: CompareConfig, run_dir: Path, data, think_tokens: int) -> dict:
    """A finished run's final model evaluated with thoughts of another length, into
    <run>/task_eval_think<n>.json."""
    metrics = TaskAccuracy(data.tokenizer, data.heldout_docs, cfg.task_problems,
                           think_tokens=think_tokens)(load_base(run_dir / "model", TTTConfig()))
    metrics["think_tokens"] = think_tokens
    path = run_dir / f"task_eval_think{think_tokens}.json"
    path.write_text(json.dumps(metrics, indent=1))
    print(f"{run_dir.name} with thoughts of up to {think_tokens} tokens: task acc after a thought "
          f"{metrics['eval/task_acc_think']:.3f}, answer NLL after a thought {metrics['eval/answer_nll_think']:.3f} -> {path}")
    return metrics


def run_seed(cfg: CompareConfig) -> dict[str, dict]:
    """Every method of cfg for its one seed, into cfg.out_dir."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "cpt_flops" in cfg.methods:
        with config_errors_exit():
            missing = [m for m in ("cpt", "rlp") if m not in cfg.methods and
                       not (out / run_name(cfg, m) / "metrics.jsonl").is_file()]
            if missing:
                raise ConfigError(f"methods=[cpt_flops] matches the FLOPs of {run_name(cfg, 'rlp')} against "
                                  f"{run_name(cfg, 'cpt')}: add {missing} to methods")
    # One tokenizer for every method, trained once on the shared train split.
    data = prepare_data(cfg.data, out, cfg.seed)
    summaries = {}
    order = run_order(cfg.methods)
    for i, method in enumerate(order, 1):
        if method.startswith("base_") and (out / method / "model" / "config.json").is_file():
            print(f"\n=== [{i}/{len(order)}] {method}: made by an earlier compare in {out / method}, reused")
        else:
            with config_errors_exit():
                pipeline, overrides = method_overrides(cfg, method, (out / "tokenizer").resolve())
            print(f"\n=== [{i}/{len(order)}] {method}: {pipeline} {' '.join(overrides)}", flush=True)
            run_pipeline(pipeline, overrides)
            summaries[method] = run_summary(out / run_name(cfg, method))
            for n in sorted(set(cfg.eval_think_tokens) - {cfg.rlp.thought_max_tokens}):
                think_eval(cfg, out / run_name(cfg, method), data, n)
        if method == "base_llama" and not (converted(cfg) / "config.json").is_file():
            convert_base_llama(cfg)
    print(f"\nruns in {out}/<method>/; the dashboard: python pipelines/report.py {out}")
    for method, s in summaries.items():
        think = (f"  task acc after a thought {s['eval/task_acc_think']:.3f}  answer NLL after a thought "
                 f"{s['eval/answer_nll_think']:.3f}" if "eval/task_acc_think" in s else "")
        print(f"{method:>10}: held-out bpb {s['eval/bpb']:.4f}  data tokens {s.get('tokens/data', 0):,.0f}{think}")
    return summaries


def main(argv: list[str]) -> dict:
    cfg = parse_config_or_exit(CompareConfig, CONFIG_DIR / "compare.yaml", argv)
    if not cfg.seeds:
        return run_seed(cfg)
    out = Path(cfg.out_dir)
    summaries = {}
    for seed in cfg.seeds:
        print(f"\n##### seed {seed}: {out / f'seed_{seed}'}")
        summaries[seed] = run_seed(dataclasses.replace(cfg, seed=seed, out_dir=str(out / f"seed_{seed}")))
    grid = seed_grid.summarize(out)
    print("\n" + seed_grid.markdown(grid))
    print(f"across seeds: {seed_grid.write(grid, out)}; the dashboard: python pipelines/report.py {out}")
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
