"""TPT's data (thinking appended and counted apart) and the comparison pipeline end to end on a
small budget, read back by the report."""

import json

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
    summaries = compare.main([f"out_dir={out}", "methods=[ntp_plain,tpt]", f"budget_tokens={budget}",
                              "eval_points=2", "task_problems=4", "windows_per_step=4", "rlp.thought_max_tokens=4",
                              f"data.cache_dir={tmp_path / 'cache'}", *SMALL])
    for method in ("ntp_plain", "tpt"):
        records = read_metrics(out / method / "metrics.jsonl")
        last = records[-1]
        assert last["tokens/data"] >= budget * 0.9 and last["tokens/data"] <= budget * 1.2, (method, last["tokens/data"])
        assert "eval/task_acc" in last and 0 <= last["eval/task_acc"] <= 1
    assert read_metrics(out / "tpt" / "metrics.jsonl")[-1]["tokens/thought"] > 0
    assert read_metrics(out / "ntp_plain" / "metrics.jsonl")[-1]["tokens/thought"] == 0
    assert summaries["tpt"]["eval/bpb"] < summaries["tpt"]["bpb_start"]
    page = report.main([str(out), "--wandb", "disabled"]).read_text()
    assert "ntp_plain" in page and "tpt" in page


def test_cpt_and_rlp_start_from_one_base_and_differ_only_in_the_rlp_term(tmp_path):
    from training.config import CONFIG_DIR, CompareConfig, load_config

    cfg = load_config(CompareConfig, CONFIG_DIR / "compare.yaml", [f"out_dir={tmp_path}", "rlp.group_size=6"])
    assert compare.run_order(["rlp", "ntp_plain", "rlp_plain", "cpt"]) == ["base_ttt", "base_plain", "rlp", "ntp_plain",
                                                                            "rlp_plain", "cpt"]
    _, cpt = compare.method_overrides(cfg, "cpt", tmp_path / "tok")
    pipeline, rlp = compare.method_overrides(cfg, "rlp", tmp_path / "tok")
    assert pipeline == "rlp_midtrain"
    assert set(cpt) ^ set(rlp) == {"run_name=cpt", "run_name=rlp", "rlp.rlp_weight=0"}
    assert f"base={tmp_path.resolve() / 'base_ttt' / 'model'}" in rlp and "rlp.group_size=6" in rlp
    _, base = compare.method_overrides(cfg, "base_ttt", tmp_path / "tok")
    assert "data.augment=think" in base and "model.mode=ttt_e2e" in base
    budget = [int(o.split("=")[1]) for o in base + rlp if o.startswith("train.data_tokens=")]
    assert sum(budget) == cfg.budget_tokens  # the base and the mid-training phase share the budget
    _, pure = compare.method_overrides(cfg, "rlp_pure", tmp_path / "tok")
    assert set(pure) ^ set(rlp) == {"run_name=rlp_pure", "run_name=rlp", "rlp.ttt_weight=0"}
    assert compare.run_order(["cpt_flops", "rlp", "cpt"]) == ["base_ttt", "rlp", "cpt", "cpt_flops"]


@pytest.mark.slow
def test_seeds_grid_runs_each_seed_from_its_own_base_and_reports(tmp_path):
    """compare.py seeds=[0,1] with cpt, rlp and cpt_flops on a tiny budget: one base per seed, cpt
    and rlp from it on the same windows, cpt_flops given rlp's FLOPs, the statistics across seeds
    written and drawn."""
    out = tmp_path / "grid"
    compare.main([f"out_dir={out}", "seeds=[0,1]", "methods=[cpt,rlp,cpt_flops]", f"budget_tokens={8 * 64 * 12}",
                  "eval_points=1", "task_problems=4", "windows_per_step=4", "rlp.thought_max_tokens=4",
                  "eval_think_tokens=[2]", f"data.cache_dir={tmp_path / 'cache'}", *SMALL])
    grid = json.loads((out / "seeds.json").read_text())
    assert grid["seeds"] == [0, 1]
    bases = [read_metrics(out / f"seed_{s}" / "base_ttt" / "metrics.jsonl")[-1]["eval/bpb"] for s in (0, 1)]
    assert bases[0] != bases[1]  # each seed its own corpus draw and base
    for s in ("0", "1"):
        runs = grid["runs"]
        rlp, cpt, matched = runs["rlp"][s], runs["cpt"][s], runs["cpt_flops"][s]
        assert rlp["phase/flops/total"] > cpt["phase/flops/total"]  # thoughts cost FLOPs
        # cpt_flops spends rlp's FLOPs, up to the last partial step
        per_step = cpt["phase/flops/total"] / (cpt["phase/tokens/data"] / (4 * 64))
        assert abs(matched["phase/flops/total"] - rlp["phase/flops/total"]) <= per_step
        assert "eval/task_acc_think@2" in rlp and "eval/task_acc_think@2" in matched
    # cpt and rlp: the same base, the same windows; only rlp samples thoughts
    seed = out / "seed_0"
    for method in ("cpt", "rlp"):
        records = read_metrics(seed / method / "metrics.jsonl")
        assert records[0]["tokens/data"] == read_metrics(seed / "base_ttt" / "metrics.jsonl")[-1]["tokens/data"]
        assert "eval/answer_nll_think" in records[-1] and 0 <= records[-1]["eval/task_acc_think"] <= 1
    cpt, rlp = (read_metrics(seed / m / "metrics.jsonl") for m in ("cpt", "rlp"))
    assert cpt[-1]["train/loss_ntp"] != rlp[-1]["train/loss_ntp"]
    assert not (seed / "cpt" / "thoughts.jsonl").exists() and (seed / "rlp" / "thoughts.jsonl").is_file()
    assert all(0 <= m["rlp/closed_frac"] <= 1 for m in rlp if "rlp/closed_frac" in m)
    pairs = {(p["a"], p["b"], p["metric"]) for p in grid["pairs"]}
    assert ("rlp", "cpt", "eval/bpb") in pairs and ("rlp", "cpt_flops", "pooled task acc after a thought") in pairs
    page = report.main([str(out), "--wandb", "disabled"]).read_text()
    assert "Across seeds [0, 1]" in page and (out / "report" / "seeds_bpb.png").is_file()
    assert "thoughts at the first RLP step" in page and (out / "report" / "rlp_diagnostics.png").is_file()


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


def test_ttt_warm_converts_its_plain_base_and_counts_its_tokens(tmp_path):
    """ttt_warm: base_llama pretrained, converted (computing the same function within the window,
    so the bridge starts at the base's final bpb), bridged on the rest of the budget; its curve
    starts at the base's data tokens."""
    out = tmp_path / "cmp"
    budget = 8 * 64 * 8
    small = [a for a in SMALL if not a.startswith("model.sliding_window")] + ["model.sliding_window=64"]
    summaries = compare.main([f"out_dir={out}", "methods=[ttt_warm]", f"budget_tokens={budget}", "eval_points=2",
                              "task_problems=0", "warm_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}", *small])
    base = read_metrics(out / "base_llama" / "metrics.jsonl")
    warm = read_metrics(out / "ttt_warm" / "metrics.jsonl")
    assert (out / "base_llama" / "converted" / "config.json").is_file()
    assert warm[0]["tokens/data"] == base[-1]["tokens/data"] and warm[0]["flops/total"] == base[-1]["flops/total"]
    assert budget * 0.9 <= warm[-1]["tokens/data"] <= budget * 1.2
    assert warm[0]["eval/bpb"] == pytest.approx(base[-1]["eval/bpb"], rel=1e-4)  # the conversion kept the function
    assert summaries["ttt_warm"]["eval/bpb"] < warm[0]["eval/bpb"]  # and the bridge trained it
