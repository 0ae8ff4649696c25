"""The pretraining pipeline end to end on a small embedded corpus: held-out loss falls, metrics
and outputs land where the README says, and a killed run resumes with the same data order."""

import pytest
import torch

import pipelines.ttt_pretrain as pretrain
from training.metrics import read_metrics
from training.data import WindowLoader
from training.trainer import Trainer


def small_run(tmp_path, cache, *extra):
    return [
        f"out_dir={tmp_path}", f"data.cache_dir={cache}", "data.num_docs=300", "data.seq_len=64",
        "data.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=128", "train.batch_size=8", "train.eval_windows=16", "optim.warmup_steps=5",
        "wandb.mode=disabled", *extra,
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


def test_short_run_lowers_heldout_bpb_and_writes_outputs(tmp_path, cache):
    summary = pretrain.main(small_run(tmp_path, cache, "train.steps=150", "train.eval_every=75", "run_name=short"))
    assert summary["eval/bpb"] < 0.8 * summary["bpb_start"], summary
    run = tmp_path / "short"
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if "eval/bpb" in r]
    assert [r["step"] for r in evals] == [0, 75, 150]
    assert records[-1]["tokens/data"] == 150 * 8 * 64 and records[-1]["flops/total"] > 0
    assert records[0]["data/docs_skipped"] == 0
    for key in ("timing_s/train", "perf/learner_tokens_per_s", "train/loss", "train/lr"):
        assert key in records[-1]
    assert (run / "model" / "config.json").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM

    import models  # noqa: F401  (registers the Auto classes)

    reloaded = AutoModelForCausalLM.from_pretrained(run / "model")
    assert reloaded.config.vocab_size > 0


def test_ttt_e2e_meta_learning_run(tmp_path, cache):
    summary = pretrain.main(small_run(tmp_path, cache, "train.steps=40", "train.eval_every=20", "run_name=ttt",
                                      "model.mode=ttt_e2e", "model.mini_batch_size=16", "model.sliding_window=16",
                                      "model.num_hidden_layers=4", "train.log_every=10", "ttt.inner_lr_warmup=0.5"))
    assert summary["eval/bpb"] < 0.85 * summary["bpb_start"], summary
    records = read_metrics(tmp_path / "ttt" / "metrics.jsonl")
    last = records[-1]
    assert last["ttt/ilr"] == pytest.approx(1.0)  # warmed up from 0.1 over the first half of the steps
    first_logged = next(r for r in records if "ttt/ilr" in r)
    assert first_logged["ttt/ilr"] < 1.0
    assert last["ttt/inner_loss_first"] > 0 and last["ttt/inner_loss_last"] > 0
    assert len(last["eval/loss_by_position"]) == 8


def test_cuda_graphs_setting_trains_as_eager(tmp_path, cache):
    """train.cuda_graphs=true gives eager training's losses: replayed on a GPU, run eagerly (said
    once) without one."""
    ttt = ["model.mode=ttt_e2e", "model.mini_batch_size=16", "model.sliding_window=16", "model.num_hidden_layers=4",
           "train.steps=6", "train.eval_every=6", "train.log_every=1", "ttt.inner_lr_warmup=0.5"]
    if torch.cuda.is_available():
        ttt.append("device=cuda")
    losses = {}
    for graphs in ("false", "true"):
        pretrain.main(small_run(tmp_path, cache, *ttt, f"train.cuda_graphs={graphs}", f"run_name=graphs_{graphs}"))
        records = read_metrics(tmp_path / f"graphs_{graphs}" / "metrics.jsonl")
        losses[graphs] = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses["true"]) == 6
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_resume_after_kill_continues_with_same_data_order(tmp_path, cache, monkeypatch):
    args = small_run(tmp_path, cache, "train.steps=16", "train.save_every=8", "train.eval_every=8", "train.log_every=1")
    whole_summary = pretrain.main(args + ["run_name=whole"])
    whole = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")}

    real_step = Trainer.train_step

    def dies_at_step_11(self, batch, *args):
        if self.step == 11:
            raise KeyboardInterrupt("killed")
        return real_step(self, batch, *args)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args + ["run_name=killed"])
    monkeypatch.setattr(Trainer, "train_step", real_step)

    seen = []
    real_next = WindowLoader.next_batch

    def spy(self):
        batch = real_next(self)
        seen.append(batch.clone())
        return batch

    monkeypatch.setattr(WindowLoader, "next_batch", spy)
    resumed_summary = pretrain.main(args + ["run_name=killed", "resume=true"])
    assert len(seen) == 8  # steps 9..16: resumed from the step-8 checkpoint, not from scratch

    resumed = {r["step"]: r for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")}
    assert sorted(resumed) == sorted(whole)  # no step logged twice, none missing
    assert resumed_summary["bpb_start"] == whole_summary["bpb_start"]  # the run's start, not where it resumed
    assert resumed_summary["bpb_start"] != resumed[8]["eval/bpb"]
    for step in range(9, 17):
        assert resumed[step]["train/loss"] == pytest.approx(whole[step]["train/loss"], rel=1e-5, abs=1e-6)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "step_00000016" / "state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "step_00000016" / "state.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_nan_loss_skips_the_step(tmp_path, cache, monkeypatch):
    from models.model import PonderForCausalLM

    real_forward = PonderForCausalLM.forward
    calls = {"n": 0}

    def nan_on_third(self, input_ids, targets=None, **kw):
        out = real_forward(self, input_ids, targets=targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PonderForCausalLM, "forward", nan_on_third)
    summary = pretrain.main(small_run(tmp_path, cache, "train.steps=5", "run_name=nan", "train.log_every=1"))
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert records[-1]["step"] == 5 and records[-1]["train/skipped_steps"] == 1
    assert summary["tokens/data"] == 6 * 8 * 64  # the skipped batch was still read


def test_training_through_the_carried_state_reads_k_windows_a_step_and_checkpoints_the_state(tmp_path, cache):
    summary = pretrain.main(small_run(
        tmp_path, cache, "run_name=carry", "model.mode=ttt_e2e", "model.mini_batch_size=16", "model.sliding_window=16",
        "ttt.carry_state=true", "ttt.carry_backprop_windows=2", "ttt.carry_stream_windows=4", "train.data_tokens=8192",
        "train.eval_every=4", "train.log_every=1", "optim.warmup_steps=2"))
    records = read_metrics(tmp_path / "carry" / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 9))  # 8192 tokens, 8 rows x 2 windows a step
    assert summary["tokens/data"] == 8192 and all(r["train/loss"] > 0 for r in records if "train/loss" in r)
    state = torch.load(tmp_path / "carry" / "checkpoints" / "step_00000008" / "state.pt", weights_only=False)
    assert state["carried"]["pos"] == 4 * 64  # the end of the rows' streams of 4 windows
