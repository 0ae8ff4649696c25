"""Memory beyond the window: a long document streamed through consecutive windows, with or without
the model's state carried from one window to the next (ttt.carry_state).

Carried, every sequence keeps one DecodeState across windows: the attention cache (the last
`sliding_window` keys with SWA and TTT-E2E; every key with full attention) and every level's fast
weights, so streaming equals one forward over the whole document. Not carried, every window
starts afresh: from W_0, with an empty cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.hf import is_ponder, is_ttt
from training.data import split_window


@torch.no_grad()
def stream_losses(model, stream: torch.Tensor, window: int, carry: bool, boundary_id: int | None = None) -> torch.Tensor:
    """Next-token loss (nats) of every target of `stream` ([B, N+1] tokens, each row one long
    document), read in consecutive windows of `window` tokens. [B, N]."""
    if carry and not is_ponder(model):
        raise ValueError("carrying state across windows needs a Ponder model (its DecodeState)")
    inputs, targets = split_window(stream, boundary_id)
    state = model.new_state(stream.shape[0]) if carry else None
    losses = []
    for start in range(0, inputs.shape[1], window):
        ids, tgt = inputs[:, start : start + window], targets[:, start : start + window]
        # A TTT-E2E model learns from the targets evaluation may show it (boundaries masked), as in training.
        logits = model(ids, targets=tgt if is_ttt(model) else None, state=state).logits
        true = stream[:, 1 + start : 1 + start + ids.shape[1]]
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), true.flatten(), reduction="none").view(true.shape))
    return torch.cat(losses, 1)


def loss_by_position(model, documents: list[list[int]], length: int, window: int, carry: bool, batch_size: int = 8,
                     device: str | torch.device = "cpu") -> list[float]:
    """Mean loss at every position 0..length-1 over the documents of at least length+1 tokens
    (each cut to its first length+1)."""
    rows = torch.tensor([d[: length + 1] for d in documents if len(d) > length], dtype=torch.long)
    if len(rows) == 0:
        raise ValueError(f"no document has more than {length} tokens")
    was_training = model.training
    model.eval()
    total = torch.zeros(length, dtype=torch.float64)
    for i in tqdm(range(0, len(rows), batch_size), desc=f"loss by position (carry={carry})", leave=False):
        total += stream_losses(model, rows[i : i + batch_size].to(device), window, carry).double().sum(0).cpu()
    model.train(was_training)
    return (total / len(rows)).tolist()


def log_buckets(length: int, first: int = 1) -> list[tuple[int, int]]:
    """Spans [a, b) of positions, doubling from `first` (with [0, first) before them): the log-x
    axis of loss by position."""
    spans, a = [(0, first)], first
    while a < length:
        spans.append((a, min(length, 2 * a)))
        a *= 2
    return spans


def bucketed(losses: list[float], spans: list[tuple[int, int]]) -> list[float]:
    return [sum(losses[a:b]) / (b - a) for a, b in spans]


def write_curves(path: str | Path, curves: dict[str, dict]) -> Path:
    """long_context.json: {run: {"carry": bool, "window": W, "positions": [...], "loss": [...]}}."""
    path = Path(path)
    path.write_text(json.dumps(curves, indent=1))
    return path


def mean_loss(curve: dict, start: int = 0, end: float = math.inf) -> float:
    """Mean loss over the positions in [start, end) (buckets wholly inside), e.g. beyond the
    sliding window (start=W) or within it (end=W)."""
    pairs = [(b - a, y) for (a, b), y in zip(curve["positions"], curve["loss"]) if a >= start and b <= end]
    weight = sum(w for w, _ in pairs)
    return sum(w * y for w, y in pairs) / weight if weight else math.nan


def measure(model, documents: list[list[int]], length: int, window: int, name: str, device) -> dict[str, dict]:
    """The run's loss by position, with and without carried state, bucketed on a log axis."""
    spans = log_buckets(length, first=8)
    out = {}
    for carry in (False, True):
        losses = loss_by_position(model, documents, length, window, carry, device=device)
        out[f"{name}{' +carry' if carry else ''}"] = {"carry": carry, "window": model.config.sliding_window,
                                                      "positions": spans, "loss": bucketed(losses, spans)}
    return out


# ------------------------------------------------------------------------------------ the runs


def long_documents_jsonl(source: str, out: Path) -> Path:
    """One JSON line {"text": ...} per text file at `source` (a folder, a file or a glob)."""
    from training.data import _data_files

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for path in _data_files(source):
            f.write(json.dumps({"text": Path(path).read_text(errors="replace")}) + "\n")
    return out


def arm_config(cfg, arm: str, corpus: Path, tokenizer_dir: Path):
    """The pretraining config of one arm: the shared model shape, data and budget, its own mode."""
    import dataclasses

    from training.config import LoopConfig, OptimConfig, PretrainConfig, WandbConfig, check_config
    from training.optim import steps_for_tokens

    mode = {"cms": "ttt_e2e"}.get(arm, arm)
    model = dataclasses.replace(cfg.model, mode=mode, cms_chunk_sizes=list(cfg.cms_chunk_sizes) if arm == "cms" else [])
    data = dataclasses.replace(cfg.data, source=str(corpus), format="jsonl", text_field="text", tokenizer=str(tokenizer_dir))
    steps = steps_for_tokens(cfg.data_tokens, cfg.batch_size * cfg.ttt.windows_per_step * cfg.data.seq_len)
    pretrain = PretrainConfig(
        run_name=arm, out_dir=cfg.out_dir, seed=cfg.seed, model=model, data=data, ttt=cfg.ttt,
        optim=OptimConfig(lr=cfg.lr, end_lr=cfg.lr / 100, warmup_steps=min(30, steps)),
        train=LoopConfig(steps=steps, data_tokens=cfg.data_tokens, batch_size=cfg.batch_size, eval_every=max(1, steps // 4),
                         eval_windows=32, save_every=steps, log_every=10),
        wandb=WandbConfig(mode="disabled"))
    check_config(pretrain)
    return pretrain


def heldout_segments(data, length: int, count: int) -> list[list[int]]:
    """Up to `count` segments of length+1 tokens cut from the held-out documents, taken in turn
    from each document so that every document contributes."""
    docs = [data.tokenizer(t, add_special_tokens=False)["input_ids"] for t in data.heldout_docs["text"]]
    cuts = [[d[i : i + length + 1] for i in range(0, len(d) - length, length + 1)] for d in docs]
    segments = []
    for k in range(max(map(len, cuts), default=0)):
        segments += [c[k] for c in cuts if k < len(c)]
    return segments[:count]


def run_long_context(cfg) -> dict[str, dict]:
    """Train every arm on the same corpus and budget, then measure loss by position out to
    eval_windows_of_context sliding windows, with and without carried state. Writes
    <out_dir>/long_context.json (the dashboard's long-context panel)."""
    from models import PonderForCausalLM
    from training.data import prepare_data
    from training.run import prepare_run_dir, resolve_device
    from training.trainer import run_pretraining

    out = Path(cfg.out_dir)
    corpus = long_documents_jsonl(cfg.data.source, out / "corpus" / "documents.jsonl")
    print(f"corpus: {corpus} (one document per file of {cfg.data.source})")
    shared = arm_config(cfg, cfg.arms[0], corpus, out / "tokenizer")
    data = prepare_data(shared.data, out, cfg.seed)  # trains the shared tokenizer once
    device = resolve_device("auto")
    length = cfg.eval_windows_of_context * cfg.model.sliding_window
    segments = heldout_segments(data, length, cfg.eval_segments)
    print(f"evaluating {len(segments)} held-out segments of {length} tokens in windows of {cfg.data.seq_len}")
    curves, params = {}, {}
    for arm in cfg.arms:
        pretrain = arm_config(cfg, arm, corpus, out / "tokenizer")
        model_dir = out / arm / "model"
        if not (cfg.reuse and (model_dir / "config.json").is_file()):
            run_dir = prepare_run_dir(pretrain)
            run_pretraining(pretrain, prepare_data(pretrain.data, run_dir, cfg.seed), run_dir, device)
        model = PonderForCausalLM.from_pretrained(model_dir).to(device)
        params[arm] = model.num_params()
        curves.update(measure(model, segments, length, cfg.data.seq_len, arm, device))
    for curve in curves.values():
        curve.update(train_window=cfg.data.seq_len, data_tokens=cfg.data_tokens)
    path = write_curves(out / "long_context.json", curves)
    W = cfg.model.sliding_window
    for name, c in curves.items():
        arm = name.split(" ")[0]
        print(f"{name:>16}: {params[arm] / 1e6:.3f}M params; mean loss within the window {mean_loss(c, end=W):.4f}, "
              f"beyond it {mean_loss(c, W):.4f}, beyond the training window {mean_loss(c, cfg.data.seq_len):.4f}")
    print(f"curves in {path}; the dashboard: python pipelines/report.py {out}")
    return curves
