"""RLP's evaluation and data around thoughts: the worked-arithmetic benchmark, documents with a
thought before the answer, answers scored with and without a thought, Wilson intervals, positions
chosen by entropy."""

import re

import pytest
import torch

from training.arithmetic import worked_arithmetic
from training.config import DataConfig
from training.data import prepare_data
from training.evaluate import TaskAccuracy, wilson_interval


def test_worked_arithmetic_steps_and_answers_are_right():
    rows = worked_arithmetic(200, seed=3)
    assert rows == worked_arithmetic(200, seed=3) and rows != worked_arithmetic(200, seed=4)
    for row in rows:
        expr = re.fullmatch(r"What is (.*)\?", row["question"]).group(1)
        assert int(row["answer"]) == eval(expr)
        for line in row["solution"].split("\n"):  # every written step is true
            left, right = line.split(" = ")
            assert eval(left) == int(right), line
        assert row["solution"].split(" = ")[-1] == row["answer"]  # the last step gives the answer


@pytest.fixture(scope="module")
def think_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("think")
    cfg = DataConfig(num_docs=300, tasks=["worked_arithmetic", "products"], seq_len=64, vocab_size=400,
                     cache_dir=str(tmp / "cache"), augment="think")
    data = prepare_data(cfg, tmp / "run", seed=0)
    data.run_dir = tmp / "run"
    return data


def test_think_documents_insert_the_solution_as_a_thought_the_document_reads_on_after(think_data, tmp_path):
    tok = think_data.tokenizer
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    stream = torch.cat([think_data.train_windows[0], *[w[1:] for w in think_data.train_windows[1:]]])
    mask = torch.cat([think_data.train_thought_mask[0], *[m[1:] for m in think_data.train_thought_mask[1:]]])
    inside, expected = False, []
    for t in stream.tolist():  # the thought mask is exactly the <think> ... </think> spans
        inside = inside or t == think
        expected.append(inside)
        inside = inside and t != end
    assert mask.tolist() == expected and 0 < mask.float().mean() < 0.5
    # Without its thoughts the stream is the original documents; each thought is its document's
    # worked solution, at positions that vary from document to document.
    plain = prepare_data(DataConfig(num_docs=300, tasks=["worked_arithmetic", "products"], seq_len=64, vocab_size=400,
                                    cache_dir=str(think_data.run_dir.parent / "cache"),
                                    tokenizer=str(think_data.run_dir / "tokenizer")), tmp_path, seed=0)
    plain_stream = torch.cat([plain.train_windows[0], *[w[1:] for w in plain.train_windows[1:]]]).tolist()
    kept = stream[~mask].tolist()
    m = min(len(kept), len(plain_stream))
    assert m > 1000 and kept[:m] == plain_stream[:m]
    text = tok.decode(stream.tolist())
    thoughts = re.findall(r"<think>(.*?)</think>", text, flags=re.S)
    assert len(thoughts) > 20 and all(re.fullmatch(r"[\d +*=\n]+", t) for t in thoughts)
    offsets = {len(doc.split("<think>")[0]) for doc in text.split("<|eos|>") if "<think>" in doc}
    assert len(offsets) > 10
    assert not (think_data.heldout_windows == think).any()  # held-out documents stay original


def test_wilson_interval_covers_the_true_rate():
    gen = torch.Generator().manual_seed(0)
    n, p, trials = 256, 0.3, 2000
    hits = torch.binomial(torch.full((trials,), float(n)), torch.full((trials,), p), generator=gen).long().tolist()
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(k, n) for k in hits)) / trials
    assert 0.93 <= covered <= 0.97, covered
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0 < hi < 0.35  # never the degenerate [0, 0] of the normal interval


def test_answer_nll_matches_a_plain_forward_with_and_without_a_thought(think_data):
    from models import PonderConfig, PonderForCausalLM

    tok = think_data.tokenizer
    torch.manual_seed(0)
    model = PonderForCausalLM(PonderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                           intermediate_size=64, mode="ttt_e2e", mini_batch_size=8, sliding_window=16))
    docs = think_data.heldout_docs.filter(lambda r: r["task"] == "worked_arithmetic").select(range(3))
    ev = TaskAccuracy(tok, docs, problems=3, max_new_tokens=4, think_tokens=5)
    metrics = ev(model)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    nll, count = 0.0, 0
    for row in docs:
        prompt = enc(f"Question: {row['question']}\n") + enc("Answer:")
        answer = enc(f"Answer: {row['answer']}")[len(enc("Answer:")):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0], -1)
        nll -= sum(logp[len(prompt) - 1 + i, a].item() for i, a in enumerate(answer))
        count += len(answer)
    assert metrics["eval/answer_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["eval/answer_nll_think"] != pytest.approx(metrics["eval/answer_nll"], rel=1e-6)  # the thought is read
    for key in ("eval/task_acc", "eval/task_acc_think", "eval/think_closed_frac"):
        assert 0 <= metrics[key] <= 1
    lo, hi = metrics["eval/task_acc_think_ci"]
    assert lo <= metrics["eval/task_acc_think"] <= hi


def test_entropy_positions_follow_the_weights():
    from rollout.worker import choose_positions

    gen = torch.Generator().manual_seed(0)
    weights = torch.zeros(33)
    weights[[20, 27]] = 1.0
    for _ in range(20):
        assert choose_positions(32, 2, 16, gen, weights) == [20, 27]
    weights[5] = 100.0  # before min_context: never chosen
    picks = [choose_positions(32, 1, 16, gen, weights)[0] for _ in range(200)]
    assert set(picks) == {20, 27}
    uniform = {choose_positions(32, 1, 16, gen)[0] for _ in range(400)}
    assert uniform == set(range(16, 33))
