"""RPT: the proxy-entropy filter, grading boxed predictions by bytes, the torch engine on a Hugging
Face causal LM, TRL's GRPOTrainer on the same setup, the proxy check, and the Ray pipeline."""

import json
import math

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from rewards import get_reward
from rollout.tokens import token_bytes
from rollout.rpt import candidate_positions, proxy_entropy, top_k_entropy
from training.config import CONFIG_DIR, RPTTrainConfig, load_config
from training.rpt import bucket_accuracy, graded
from training.tokenizer import train_tokenizer

CORPUS = [f"Question: what is {i} + {i * 3}? Answer: {i * 4}. Café {i}." for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


def test_top_k_entropy_by_hand():
    # 16 equal logits among 40 far lower ones: the top 16, renormalised, are uniform.
    logits = torch.full((40,), -30.0)
    logits[:16] = 2.0
    assert top_k_entropy(logits, 16).item() == pytest.approx(math.log(16), rel=1e-5)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])  # k=2 keeps 0.5 and 0.3, renormalised to 5/8 and 3/8
    h = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    assert top_k_entropy(p.clamp(min=1e-30).log(), 2).item() == pytest.approx(h, rel=1e-5)


def test_entropy_filter_keeps_exactly_the_positions_above_the_threshold():
    torch.manual_seed(0)
    proxy = PonderForCausalLM(PonderConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=48, mode="ttt_e2e", sliding_window=8, mini_batch_size=4))
    proxy.eval()
    windows = torch.randint(0, 40, (3, 17))
    entropy = proxy_entropy(proxy, windows, k=16, batch_size=2)
    # The direct way: the proxy reads x_<t alone, float64 softmax, the top 16 renormalised.
    direct = torch.zeros(3, 17, dtype=torch.float64)
    with torch.no_grad():
        for n in range(3):
            for t in range(1, 17):
                p = torch.softmax(proxy(windows[n : n + 1, :t]).logits[0, -1].double(), -1).topk(16).values
                p = p / p.sum()
                direct[n, t] = -(p * p.log()).sum()
    torch.testing.assert_close(entropy.double(), direct, atol=1e-4, rtol=1e-4)
    # A threshold in the middle of the widest gap between neighbouring values: no value sits on it.
    values = direct[:, 4:].flatten().sort().values
    gap = (values[1:] - values[:-1]).argmax()
    threshold = ((values[gap] + values[gap + 1]) / 2).item()
    for n in range(3):
        kept = candidate_positions(entropy[n], threshold, min_context=4)
        assert kept == [t for t in range(4, 17) if direct[n, t] > threshold]
    assert 0 < sum(len(candidate_positions(e, threshold, 4)) for e in entropy) < 3 * 13


def test_prediction_boxed_across_tokens_scores_by_the_byte_rule(tok):
    reward = get_reward("rpt_prefix_match")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    close, eos = tok.convert_tokens_to_ids("</think>"), tok.eos_token_id
    context, target = enc("Question: what is 1 + 41? Answer:"), enc(" 42. Café")
    assert len(enc(" 42")) >= 2  # the prediction spans several tokens of the response

    def response(*pieces):  # thought, </think>, then the box written piece by piece
        return enc("so") + [close] + enc("\\boxed{") + [i for p in pieces for i in enc(p)] + enc("}") + [eos]

    assert graded(tok, reward, context, target, response(" 4", "2"))  # two true tokens, ends on a boundary
    assert graded(tok, reward, context, target, response(" 4"))
    assert not graded(tok, reward, context, target, response("4", "2"))  # the space is a byte too
    assert not graded(tok, reward, context, target, response(" 4", "3"))
    # "é" is two bytes: one token each in the response; the target has whatever tokens the tokenizer makes.
    e_bytes = tok.convert_tokens_to_ids(["Ã", "©"])
    assert tok.decode(e_bytes) == "é"
    target_e = enc("é.")
    boundaries = {b"".join(token_bytes(tok, target_e[:k])) for k in range(1, len(target_e) + 1)}
    assert graded(tok, reward, context, target_e, response(tok.decode(e_bytes[:1]), "")) is False  # half a character
    boxed_e = enc("so") + [close] + enc("\\boxed{") + e_bytes + enc("}") + [eos]
    assert graded(tok, reward, context, target_e, boxed_e) == ("é".encode() in boundaries)
    assert graded(tok, reward, context, target_e, boxed_e) and len(target_e) == 3  # here the target splits é too


def test_buckets_nest_by_entropy():
    m = bucket_accuracy([True, False, True, True], [0.6, 1.2, 1.6, 0.4])
    assert m["eval/rpt_n_easy"] == 3 and m["eval/rpt_acc_easy"] == pytest.approx(2 / 3)
    assert m["eval/rpt_n_medium"] == 2 and m["eval/rpt_acc_medium"] == pytest.approx(1 / 2)
    assert m["eval/rpt_n_hard"] == 1 and m["eval/rpt_acc_hard"] == 1.0


def test_torch_engine_on_a_hugging_face_model_matches_its_forward(tok):
    """The engine decodes a Llama through its KV cache; the learner recomputes the same log-probs
    in one forward (the PPO ratio starts at 1)."""
    from rollout.torch_engine import TorchEngine

    model = tiny_llama(tok)
    engine = TorchEngine(model, seed=0)
    prompt = tok("Question: what is 3 + 9?", add_special_tokens=False)["input_ids"]
    gens = engine.generate([prompt], n=3, max_new_tokens=6, temperature=0.8)[0]
    for g in gens:
        ids = torch.tensor([prompt + g.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float() / 0.8, -1)
        expected = logp[len(prompt) - 1 : -1].gather(-1, torch.tensor(g.ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert len({tuple(g.ids) for g in gens}) > 1  # the rows sample on their own


@pytest.mark.slow
def test_trl_grpo_runs_two_steps_on_cpu(tok, tmp_path):
    from training.trl_rpt import rpt_prompts, train_trl

    model = tiny_llama(tok)
    cfg = load_config(RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml",
                      ["base=x", "rlp.group_size=4", "rollout.windows_per_step=2", "rpt.response_max_tokens=6",
                       "rlp.min_context=4", "optim.lr=1e-3"])
    windows = torch.tensor([tok(CORPUS[i], add_special_tokens=False)["input_ids"][:13] for i in range(6)])
    dataset = rpt_prompts(tok, model, windows, cfg.rpt, cfg.rlp, seed=0)
    assert len(dataset) == 6  # a random proxy is uncertain everywhere: one position per window
    assert dataset[0]["prompt"].endswith("<think>")
    logs, times = train_trl(cfg, model, tok, dataset, steps=2, out_dir=tmp_path / "trl")
    assert len(logs) == 2 and len(times) == 2
    assert all(0.0 <= e["reward"] <= 1.0 and math.isfinite(e["loss"]) and e["num_tokens"] > 0 for e in logs)


def corpus_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return path


@pytest.mark.parametrize("proxy_vocab", ["its own size", "the policy's size"])
def test_proxy_with_another_vocabulary_fails_at_start_naming_both(tok, tmp_path, capsys, proxy_vocab):
    import ray

    import pipelines.rpt_train as rpt_train

    tiny_llama(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    other = train_tokenizer(CORPUS[:50], vocab_size=280)
    assert len(other) != len(tok)
    # A model of the other tokenizer's size, or of the policy's size with the other tokenizer beside it.
    tiny_llama(other if proxy_vocab == "its own size" else tok).save_pretrained(tmp_path / "proxy")
    other.save_pretrained(tmp_path / "proxy")
    with pytest.raises(SystemExit) as exit_info:
        rpt_train.main([f"base={tmp_path / 'base'}", f"rpt.proxy={tmp_path / 'proxy'}", f"data.source={corpus_file(tmp_path)}",
                        f"out_dir={tmp_path / 'runs'}", "data.seq_len=24", "rlp.min_context=8", "wandb.mode=disabled"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error")]
    assert len(err) == 1 and f"rpt.proxy={tmp_path / 'proxy'}" in err[0] and f"base={tmp_path / 'base'}" in err[0]
    assert f"{len(other)} tokens" in err[0] and f"{len(tok)} tokens" in err[0]
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()  # before Ray, before the run directory


@pytest.mark.slow
def test_rpt_pipeline_on_ray_with_a_ttt_policy(tok, tmp_path, ray_cluster):
    import pipelines.rpt_train as rpt_train

    torch.manual_seed(0)
    PonderForCausalLM(PonderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=64, mode="ttt_e2e", sliding_window=16, mini_batch_size=8,
                                   eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    summary = rpt_train.main([f"base={tmp_path / 'base'}", f"data.source={corpus_file(tmp_path)}", f"out_dir={tmp_path / 'runs'}",
                              "data.seq_len=24", "rlp.min_context=8", "rlp.group_size=3", "rpt.response_max_tokens=4",
                              "rpt.eval_positions=6", "train.steps=2", "train.eval_every=2", "rollout.windows_per_step=2",
                              "wandb.mode=disabled", "optim.lr=1e-3", "optim.end_lr=1e-3"])
    records = [json.loads(line) for line in (tmp_path / "runs" / "rpt_train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rlp/samples" in r]
    assert len(steps) == 2 and all(r["rlp/samples"] == 2 * 3 for r in steps)  # a random proxy keeps every position
    assert all(r["rlp/ratio_mean"] == pytest.approx(1.0, abs=1e-4) for r in steps)  # exactly on-policy
    assert summary["eval/rpt_n_easy"] == 6 and 0.0 <= summary["eval/rpt_acc_easy"] <= 1.0
    assert (tmp_path / "runs" / "rpt_train" / "model" / "config.json").is_file()
