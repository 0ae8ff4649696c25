"""RPT through Ponder's Ray graph (pipelines/rpt_train.py) against RPT through TRL's GRPOTrainer
(training/trl_rpt.py): the same base model, corpus windows in the same order, proxy filter, G,
temperature, optimiser, lr and number of steps. Prints held-out next-token accuracy by entropy
bucket and wall time per step side by side.

    python bench/rpt_vs_trl.py                        # a tiny Llama, CPU, a few minutes
    python bench/rpt_vs_trl.py --steps 20 --lr 1e-5

The base is a LlamaForCausalLM made here with the corpus's own tokenizer and trained briefly
(--format-steps) on the response format with empty thoughts, "x_<t <think></think>\\boxed{x_t}<eos>",
so that its responses close a box and the reward is not zero everywhere. The proxy is the base.
Positions are drawn by each side's own generator from the same windows and filter, so the two
runs see the same distribution of positions, not the same positions. Ponder's time per step is
its rollout + train + sync phases (evaluation apart); TRL's, the wall time between its optimizer
steps (generation included). Both exclude start-up, which is printed apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pipelines.rpt_train as rpt_train  # noqa: E402
from training.config import CONFIG_DIR, RPTTrainConfig, load_config  # noqa: E402
from training.data import WindowLoader, prepare_data  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.rpt import BUCKETS, RPTAccuracy  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.trl_rpt import rpt_prompts, train_trl  # noqa: E402


def format_base(data, path: Path, args) -> Path:
    """A tiny Llama trained on next-token prediction in the boxed response format, saved with its
    tokenizer at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = data.tokenizer
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
        intermediate_size=args.hidden * 3, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    cfg = load_config(RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml", [f"base={path}", f"optim.lr={args.format_lr}"])
    opt = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(args.seed)
    windows, seq_len = data.train_windows, data.train_windows.shape[1] - 1
    start = time.perf_counter()
    for step in range(args.format_steps):
        rows = []
        for i in torch.randint(len(windows), (32,), generator=g).tolist():
            t = int(torch.randint(16, seq_len + 1, (1,), generator=g))
            w = windows[i].tolist()
            box = tok(f"\\boxed{{{tok.decode([w[t]])}}}", add_special_tokens=False)["input_ids"]
            rows.append(w[:t] + [think, end] + box + [tok.eos_token_id])
        ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
        labels = torch.full_like(ids, -100)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = labels[r, : len(row)] = torch.tensor(row)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == args.format_steps:
            print(f"format warm-up step {step + 1}/{args.format_steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rpt_vs_trl")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-5, help="RL lr of both sides (the paper's 1e-6 moves a tiny model too little to see)")
    p.add_argument("--windows-per-step", type=int, default=4)
    p.add_argument("--eval-positions", type=int, default=64)
    p.add_argument("--format-steps", type=int, default=300)
    p.add_argument("--format-lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-docs", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--response-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out).resolve()
    data_keys = [f"data.num_docs={args.num_docs}", f"data.seq_len={args.seq_len}"]
    data_cfg = load_config(RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml", ["base=x", *data_keys]).data
    data = prepare_data(data_cfg, out, args.seed)  # trains the tokenizer into out/tokenizer once
    base = format_base(data, out / "base", args)
    keys = [f"base={base}", f"out_dir={out}", "wandb.mode=disabled", f"seed={args.seed}", *data_keys,
            f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.save_every={args.steps}",
            f"optim.lr={args.lr}", f"optim.end_lr={args.lr}", f"rollout.windows_per_step={args.windows_per_step}",
            f"rpt.eval_positions={args.eval_positions}", f"rpt.response_max_tokens={args.response_tokens}"]
    cfg = load_config(RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml", keys)

    start = time.perf_counter()
    ponder = rpt_train.main([*keys, "run_name=ponder"])
    ponder_total = time.perf_counter() - start
    records = read_metrics(out / "ponder" / "metrics.jsonl")
    ponder_first = records[0]
    ponder_steps = [r["timing_s/rollout"] + r["timing_s/train"] + r["timing_s/sync"] for r in records if "timing_s/train" in r]

    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base)
    proxy = AutoModelForCausalLM.from_pretrained(base).eval()
    loader = WindowLoader(data.train_windows, cfg.rollout.windows_per_step, cfg.seed)  # the batches Ponder's loop took
    windows = torch.cat([loader.next_batch() for _ in range(args.steps)])
    dataset = rpt_prompts(data.tokenizer, proxy, windows, cfg.rpt, cfg.rlp, cfg.seed)
    accuracy = RPTAccuracy(data.tokenizer, proxy, data.heldout_windows, cfg.rpt.eval_positions, cfg.rlp.min_context,
                           cfg.rpt.entropy_top_k, cfg.rpt.response_max_tokens, cfg.reward, cfg.seed)
    logs, trl_steps = train_trl(cfg, model, data.tokenizer, dataset, args.steps, out / "trl")
    trl_total = time.perf_counter() - start
    trl_final = accuracy(model)

    print(f"\nRPT, {args.steps} steps of {cfg.rollout.windows_per_step} windows x G={cfg.rlp.group_size}, lr {args.lr}, "
          f"base {args.layers}x{args.hidden} Llama, {len(accuracy)} held-out positions")
    print(f"{'':28}{'start':>8}{'Ponder':>9}{'TRL':>9}")
    for b in BUCKETS:
        k = f"eval/rpt_acc_{b}"
        label = f"{k} (n={ponder.get(f'eval/rpt_n_{b}', 0)})"
        print(f"{label:28}{ponder_first.get(k, float('nan')):>8.3f}"
              f"{ponder.get(k, float('nan')):>9.3f}{trl_final[k]:>9.3f}")
    trl_reward = statistics.mean(entry["reward"] for entry in logs) if logs else float("nan")
    ponder_reward = statistics.mean(r["rlp/reward_mean"] for r in records if "rlp/reward_mean" in r)
    print(f"{'mean training reward':28}{'':>8}{ponder_reward:>9.3f}{trl_reward:>9.3f}")
    p_med, t_med = statistics.median(ponder_steps), statistics.median(trl_steps)
    print(f"{'s/step (median)':28}{'':>8}{p_med:>9.3f}{t_med:>9.3f}   TRL / Ponder = {t_med / p_med:.2f}x")
    p_mean, t_mean = statistics.mean(ponder_steps), statistics.mean(trl_steps)
    print(f"{'s/step (mean)':28}{'':>8}{p_mean:>9.3f}{t_mean:>9.3f}   TRL / Ponder = {t_mean / p_mean:.2f}x")
    print(f"{'whole run incl. start-up, s':28}{'':>8}{ponder_total:>9.1f}{trl_total:>9.1f}")


if __name__ == "__main__":
    main()
