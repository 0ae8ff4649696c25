"""Held-out evaluation: bits per byte on original documents.

bpb = (sum of next-token losses in nats) / (ln 2 · UTF-8 bytes those tokens stand for), over the
targets that are text (special tokens such as the end-of-document separator stand for no bytes
and are left out of both sums). Unlike loss per token, it compares across tokenizers. Every text
target counts, a document's first token after the separator included, whether or not training
masks it (data.mask_boundary_targets); the mask only keeps TTT-E2E's inner loop from learning
from that target here, as in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.hf import is_ttt
from training.data import split_window


@torch.no_grad()
def heldout_bpb(model, windows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int = 16,
                device: str | torch.device = "cpu", position_buckets: int = 8, boundary_id: int | None = None) -> dict:
    """windows: [N, T+1] held-out token windows; token_bytes: [V] bytes per token id.

    Also eval/loss_by_position: the mean loss in `position_buckets` equal spans of the window,
    earliest first (with TTT-E2E it falls along the window as the fast weights learn).
    A TTT-E2E model runs its inner loop here, as at test time."""
    was_training = model.training
    model.eval()
    nats, n_bytes, n_tokens = 0.0, 0, 0
    seq_len = windows.shape[1] - 1
    pos_nats, pos_count = torch.zeros(seq_len), torch.zeros(seq_len)
    token_bytes = token_bytes.to(device)
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        inputs, targets = w[:, :-1], w[:, 1:]
        if is_ttt(model):  # the inner loop learns from the targets training would (boundaries masked)
            logits = model(inputs, targets=split_window(w, boundary_id)[1]).logits
        else:
            logits = model(inputs).logits
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        counts = token_bytes[targets.flatten()]
        is_text = counts > 0
        nats += losses[is_text].sum().item()
        n_bytes += counts.sum().item()
        n_tokens += is_text.sum().item()
        text_losses = (losses * is_text).view(targets.shape).cpu()
        pos_nats += text_losses.sum(0)
        pos_count += is_text.view(targets.shape).sum(0).cpu()
    model.train(was_training)
    by_position = [(n.sum() / c.sum().clamp(min=1)).item()
                   for n, c in zip(pos_nats.chunk(position_buckets), pos_count.chunk(position_buckets))]
    return {"eval/bpb": nats / (math.log(2) * max(n_bytes, 1)), "eval/loss": nats / max(n_tokens, 1),
            "eval/loss_by_position": by_position}


class TaskAccuracy:
    """Greedy answers to held-out problems of the embedded corpus, graded by reasoning-gym's own
    scorer (a problem counts as solved when it scores 1).

    The prompt is the document's opening, "Question: ...\\n"; the model writes on (a solution,
    then "Answer: ..."), and the text after the last "Answer:" is graded. A method that thinks
    first writes a thought between <think> and </think> (at most `think_tokens`), then answers.
    """

    def __init__(self, tokenizer, docs, problems: int = 16, max_new_tokens: int = 64, think_tokens: int = 0):
        if "question" not in docs.column_names or "answer" not in docs.column_names:
            raise KeyError(f"task accuracy needs question and answer columns; the held-out documents have {docs.column_names}")
        self.tokenizer, self.max_new_tokens, self.think_tokens = tokenizer, max_new_tokens, think_tokens
        self.rows = list(docs.select(range(min(problems, len(docs)))))
        self.think_open, self.think_close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])

    def __call__(self, model) -> dict[str, float]:
        from reasoning_gym import get_score_answer_fn

        from rollout.torch_engine import TorchEngine

        was_training, threads = model.training, torch.get_num_threads()
        torch.set_num_threads(1)  # decoding is many tiny ops: more threads only add synchronisation
        engine = TorchEngine(model, device=next(model.parameters()).device)
        prompts = [self.tokenizer(f"Question: {r['question']}\n", add_special_tokens=False)["input_ids"] for r in self.rows]
        if self.think_tokens:
            thoughts = engine.generate([p + [self.think_open] for p in prompts], 1, self.think_tokens, 0.0,
                                       stop=[self.think_close])
            prompts = [p + [self.think_open] + _closed(g[0].ids, self.think_close) for p, g in zip(prompts, thoughts)]
        outputs = engine.generate(prompts, 1, self.max_new_tokens, 0.0, stop=[self.tokenizer.eos_token_id])
        solved = 0
        for row, out in zip(self.rows, outputs):
            text = self.tokenizer.decode(out[0].ids, skip_special_tokens=True)
            answer = text.rsplit("Answer:", 1)[1].strip().split("\n")[0].strip() if "Answer:" in text else None
            entry = {"question": row["question"], "answer": row["answer"], "metadata": {}}
            solved += get_score_answer_fn(row["task"])(answer, entry) >= 1.0
        model.train(was_training)
        torch.set_num_threads(threads)
        return {"eval/task_acc": solved / max(len(self.rows), 1)}


def _closed(thought: list[int], think_close: int) -> list[int]:
    return thought if thought and thought[-1] == think_close else thought + [think_close]
