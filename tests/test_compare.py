"""TPT's data (thinking appended and counted apart) and the comparison pipeline end to end on a
small budget, read back by the report."""

import pytest
import torch

import pipelines.compare as compare
import pipelines.report as report
from training.config import DataConfig
from training.data import prepare_data
from training.metrics import read_metrics

SMALL = ["data.num_docs=300", "data.seq_len=64", "data.vocab_size=512", "model.hidden_size=64",
         "model.num_hidden_layers=4", "model.num_attention_heads=2", "model.intermediate_size=128",
         "model.mini_batch_size=16", "model.sliding_window=32", "batch_size=8", "wandb.mode=disabled"]


def test_tpt_appends_thinking_to_train_documents_only(tmp_path):
    cfg = DataConfig(num_docs=120, seq_len=64, vocab_size=400, cache_dir=str(tmp_path / "cache"), augment="tpt")
    data = prepare_data(cfg, tmp_path / "run", seed=0)
    tok = data.tokenizer
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    windows, mask = data.train_windows, data.train_thought_mask
    assert mask.shape == windows.shape and 0 < mask.float().mean() < 1
    # Thinking spans are exactly the <think> ... </think> spans of the stream.
    stream_ids = torch.cat([windows[0], *[w[1:] for w in windows[1:]]])
    stream_mask = torch.cat([mask[0], *[m[1:] for m in mask[1:]]])
    inside, expected = False, []
    for t in stream_ids.tolist():
        inside = inside or t == think
        expected.append(inside)
        inside = inside and t != end
    assert stream_mask.tolist() == expected
    assert not (data.heldout_windows == think).any()  # held-out documents stay original


def test_compare_runs_methods_on_one_budget_and_reports(tmp_path):
    out = tmp_path / "cmp"
    budget = 8 * 64 * 12
    summaries = compare.main([f"out_dir={out}", "methods=[ntp_plain,tpt]", f"budget_tokens={budget}", "eval_points=2",
                              "task_problems=2",
                              f"data.cache_dir={tmp_path / 'cache'}", *SMALL])
    for method in ("ntp_plain", "tpt"):
        records = read_metrics(out / method / "metrics.jsonl")
        last = records[-1]
        assert last["tokens/data"] >= budget * 0.9 and last["tokens/data"] <= budget * 1.2, (method, last["tokens/data"])
        assert "eval/task_acc" in last and 0 <= last["eval/task_acc"] <= 1
    assert read_metrics(out / "tpt" / "metrics.jsonl")[-1]["tokens/thought"] > 0
    assert read_metrics(out / "ntp_plain" / "metrics.jsonl")[-1]["tokens/thought"] == 0
    assert summaries["tpt"]["eval/bpb"] < summaries["tpt"]["bpb_start"]
    page = report.main([str(out), "--wandb", "disabled"])
    assert "ntp_plain" in page.read_text() and "tpt" in page.read_text()


def test_unknown_method_is_refused():
    from training.config import CONFIG_DIR, CompareConfig, ConfigError, load_config

    with pytest.raises(ConfigError, match=r"methods=.*must be a non-empty list drawn from"):
        load_config(CompareConfig, CONFIG_DIR / "compare.yaml", ["methods=[ntp_plain,mamba]"])


def test_tpt_augment_writes_thinking_with_a_model(tmp_path):
    """pipelines/tpt_augment.py on Ray: every document gets a thinking column, which TPT then reads."""
    import pipelines.tpt_augment as tpt_augment
    from models import PonderConfig, PonderForCausalLM
    from training.tokenizer import train_tokenizer

    tok = train_tokenizer([f"Question: {i} + {i}? Answer: {2 * i}" for i in range(100)], vocab_size=300)
    tok.save_pretrained(tmp_path / "tokenizer")
    PonderForCausalLM(PonderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48)).save_pretrained(tmp_path / "model")
    out = tpt_augment.main([f"model={tmp_path / 'model'}", f"out={tmp_path / 'docs.jsonl'}", "max_docs=10",
                            "max_thinking_tokens=6", "data.num_docs=60", f"data.cache_dir={tmp_path / 'cache'}"])
    from training.data import load_documents

    docs = load_documents(str(out))
    assert len(docs) == 10 and all(isinstance(t, str) for t in docs["thinking"])
    assert sum(len(t) > 0 for t in docs["thinking"]) >= 5
