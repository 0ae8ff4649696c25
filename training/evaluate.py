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
from training import arithmetic
from training.data import split_window


@torch.no_grad()
def heldout_bpb(model, windows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int = 16,
                device: str | torch.device = "cpu", position_buckets: int = 8, boundary_id: int | None = None,
                carry_state: bool = False) -> dict:
    """windows: [N, T+1] held-out token windows; token_bytes: [V] bytes per token id.

    Also eval/loss_by_position: the mean loss in `position_buckets` equal spans of the window,
    earliest first (with TTT-E2E it falls along the window as the fast weights learn).
    A TTT-E2E model runs its inner loop here, as at test time. carry_state: the windows (consecutive
    pieces of the held-out stream) are read as `batch_size` streams of consecutive windows, each
    stream's state (attention cache, fast weights) carried from one window to the next."""
    was_training = model.training
    model.eval()
    nats, n_bytes, n_tokens = 0.0, 0, 0
    seq_len = windows.shape[1] - 1
    pos_nats, pos_count = torch.zeros(seq_len), torch.zeros(seq_len)
    token_bytes = token_bytes.to(device)
    state = None
    if carry_state:
        streams = min(batch_size, len(windows))
        per_stream = len(windows) // streams
        batches = windows[: streams * per_stream].view(streams, per_stream, -1).unbind(1)
        state = model.new_state(streams)
    else:
        batches = windows.split(batch_size)
    for w in batches:
        w = w.to(device)
        inputs, targets = w[:, :-1], w[:, 1:]
        if is_ttt(model):  # the inner loop learns from the targets training would (boundaries masked)
            logits = model(inputs, targets=split_window(w, boundary_id)[1], state=state).logits
        elif state is not None:
            logits = model(inputs, state=state).logits
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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class TaskAccuracy:
    """Held-out problems answered with and without a thought (methods.md §1: RLP is evaluated
    with reasoning).

    Without: the prompt "Question: q\\nAnswer:". With (think_tokens > 0): "Question: q\\n<think>",
    a greedy thought of at most think_tokens (closed if the model did not close it), then
    "</think>Answer:": the document read on after the thought, as data.augment=think trains. For each:
      eval/answer_nll[_think]  mean NLL per token of the true answer, teacher-forced;
      eval/task_acc[_think]    the greedy answer (up to the line's end) graded by the task's scorer
                               (reasoning-gym's, or exact match for worked_arithmetic), with its
                               95% Wilson interval as eval/task_acc[_think]_ci = [low, high].
    eval/think_closed_frac: the share of thoughts the model closed itself; eval/task_problems: how many.
    """

    def __init__(self, tokenizer, docs, problems: int = 16, max_new_tokens: int = 16, think_tokens: int = 0):
        if "question" not in docs.column_names or "answer" not in docs.column_names:
            raise KeyError(f"task accuracy needs question and answer columns; the held-out documents have {docs.column_names}")
        self.tokenizer, self.max_new_tokens, self.think_tokens = tokenizer, max_new_tokens, think_tokens
        self.rows = list(docs.select(range(min(problems, len(docs)))))
        self.think_open, self.think_close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
        # Tokenized once: every evaluation reads the same problems.
        self.heads = [self._enc(f"Question: {r['question']}\n") for r in self.rows]
        self.lead = self._enc("Answer:")
        self.answers = [self._answer_ids(r["answer"]) for r in self.rows]

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens as they follow "Answer:" in text."""
        full = self._enc(f"Answer: {answer}")
        if full[: len(self.lead)] != self.lead:  # the tokenizer merged across the boundary: no clean split
            raise ValueError(f"cannot split 'Answer:' from the answer {answer!r} in tokens")
        return full[len(self.lead):]

    def __call__(self, model) -> dict[str, float]:
        from rollout.torch_engine import TorchEngine

        was_training, threads = model.training, torch.get_num_threads()
        torch.set_num_threads(1)  # decoding is many tiny ops: more threads only add synchronisation
        model.eval()
        engine = TorchEngine(model, device=next(model.parameters()).device)
        metrics = {"eval/task_problems": len(self.rows),
                   **self._answer(engine, model, [h + self.lead for h in self.heads], "")}
        if self.think_tokens:
            opened = [h + [self.think_open] for h in self.heads]
            thoughts = [g[0].ids for g in engine.generate(opened, 1, self.think_tokens, 0.0, stop=[self.think_close])]
            closed = [bool(t) and t[-1] == self.think_close for t in thoughts]
            prompts = [o + (t if c else t + [self.think_close]) + self.lead for o, t, c in zip(opened, thoughts, closed)]
            metrics.update(self._answer(engine, model, prompts, "_think"))
            metrics["eval/think_closed_frac"] = sum(closed) / max(len(closed), 1)
        model.train(was_training)
        torch.set_num_threads(threads)
        return metrics

    @torch.no_grad()
    def _answer(self, engine, model, prompts: list[list[int]], suffix: str) -> dict:
        """answer_nll and task_acc for prompts that end where the answer begins."""
        answers = self.answers
        nats, count = 0.0, 0
        for i in range(0, len(prompts), 32):  # teacher-forced, right-padded batches
            seqs = [p + a for p, a in zip(prompts[i : i + 32], answers[i : i + 32])]
            ids = torch.full((len(seqs), max(map(len, seqs))), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
            logp = torch.log_softmax(model(ids.to(engine.device)).logits.float(), -1).cpu()
            for r, (p, a) in enumerate(zip(prompts[i : i + 32], answers[i : i + 32])):
                steps = torch.arange(len(p) - 1, len(p) - 1 + len(a))
                nats -= logp[r, steps, torch.tensor(a)].sum().item()
                count += len(a)
        outputs = engine.generate(prompts, 1, self.max_new_tokens, 0.0, stop=[self.tokenizer.eos_token_id])
        solved = 0
        for row, out in zip(self.rows, outputs):
            text = self.tokenizer.decode(out[0].ids, skip_special_tokens=True).strip().split("\n")[0].strip()
            solved += score(row, text) >= 1.0
        n = len(self.rows)
        return {f"eval/answer_nll{suffix}": nats / max(count, 1), f"eval/task_acc{suffix}": solved / max(n, 1),
                f"eval/task_acc{suffix}_ci": list(wilson_interval(solved, n))}


def score(row: dict, answer: str) -> float:
    """The task's own grade of `answer` (1.0: solved)."""
    if row["task"] == arithmetic.TASK:
        return arithmetic.score_answer(answer, row["answer"])
    from reasoning_gym import get_score_answer_fn

    return get_score_answer_fn(row["task"])(answer, {"question": row["question"], "answer": row["answer"], "metadata": {}})
