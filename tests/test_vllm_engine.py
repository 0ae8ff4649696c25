"""The vLLM rollout engine on a tiny random Llama, against Hugging Face forwards on the same
weights: thought log-probs (at the sampling temperature, before top-p), forced </think>, scores
of the next token with and without a thought, generation, scoring, weights loaded in place; two
RLP steps through the Ray graph with a vLLM rollout worker and a learner training the Llama; the
clear refusal of Ponder models vLLM cannot serve (tests/test_vllm_ponder.py serves the others).

vLLM's CPU build runs these in float32, where its log-probs equal the Hugging Face forward's to
about 1e-6 (measured max abs difference 4.8e-7); the tolerance is 1e-4.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from models import PonderConfig, PonderForCausalLM
from rollout import Engine, TorchEngine
from rollout.vllm_engine import VLLMEngine
from rollout.rollouts import Rollouts
from training.config import CONFIG_DIR, RLPMidtrainConfig, load_config

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (`make install` adds it, or pip install -e '.[vllm]')")
TOL = 1e-4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from training.tokenizer import train_tokenizer

    tok = train_tokenizer([f"Question: what is {i} + {i * 3}? Answer: {i * 4}" for i in range(200)], vocab_size=300)
    tok.save_pretrained(tmp_path_factory.mktemp("tok"))
    return tok


def llama(tok, seed: int):
    """A tiny random Llama (head dim 32: vLLM's CPU attention refuses 16). Its embeddings are
    scaled up so next-token distributions are sharp enough for a chosen </think> to be sampled."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    model = llama(tok, seed=0)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def engine(base):
    """One vLLM engine for the module (it takes about half a minute to start on a CPU)."""
    engine = VLLMEngine(base[1], seed=0, dtype="float32", max_model_len=256)
    yield engine
    engine.close()


@torch.no_grad()
def logprobs_of(model, ids, temperature=1.0):
    """log softmax(logits / temperature) of one forward over the whole sequence, [T, V]."""
    return F.log_softmax(model(torch.tensor([ids])).logits[0].float() / temperature, -1)


def last_logprobs(model, sequences, targets) -> list[float]:
    """log p(targets[i] | sequences[i]) by a plain forward each."""
    return [logprobs_of(model, s)[-1, t].item() for s, t in zip(sequences, targets)]


def max_diff(actual, expected) -> float:
    actual, expected = (torch.as_tensor(x, dtype=torch.float32) for x in (actual, expected))
    return (actual - expected).abs().max().item()


def thought_diffs(model, groups, contexts, next_tokens, n, think_open, close, max_new, temperature):
    """Max abs differences between `think`'s log-probs and the model's own forward (each thought's
    tokens at the sampling temperature; x_t with and without it through the torch engine, which
    scores any causal LM), and the thoughts' lengths; asserts the groups' shape on the way."""
    scorer = TorchEngine(model)
    diffs, lengths = [], []
    for context, next_token, group in zip(contexts, next_tokens, groups):
        assert len(group.thoughts) == len(group.thought_logprobs) == len(group.logp_next_with_thought) == n
        diffs.append(max_diff(group.logp_next_no_thought, scorer.score([context], [next_token])))
        for thought, thought_logprobs, truncated in zip(group.thoughts, group.thought_logprobs, group.truncated):
            assert thought[-1] == close and close not in thought[:-1]
            assert len(thought_logprobs) == len(thought) <= max_new + 1
            assert truncated == (len(thought) == max_new + 1)
            lengths.append(len(thought))
            full = context + [think_open] + thought
            # Thought token u is predicted at the position before it; forced </think>s included.
            expected = logprobs_of(model, full, temperature)[torch.arange(len(context), len(full) - 1), thought]
            diffs.append(max_diff(thought_logprobs, expected))
        with_thought = scorer.score([context + [think_open] + th for th in group.thoughts], [next_token] * n)
        diffs.append(max_diff(group.logp_next_with_thought, with_thought))
    return diffs, lengths


@needs_vllm
def test_think_matches_the_hugging_face_forward(engine, base, tok):
    model = base[0]
    think_open = tok.convert_tokens_to_ids("<think>")
    contexts = [tok(t)["input_ids"] for t in ("Question: what is 3 + 9?", "Answer: 1", "what is 12 + 36? Answer")]
    next_tokens = [5, 17, 41]
    # </think> := the most likely token after the first context's <think>, so some thoughts stop early.
    close = logprobs_of(model, contexts[0] + [think_open])[-1].argmax().item()
    temperature, top_p, max_new = 0.7, 0.9, 6
    groups = engine.think(contexts, next_tokens, n=8, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                          think_open=think_open, think_close=close)
    diffs, lengths = thought_diffs(model, groups, contexts, next_tokens, 8, think_open, close, max_new, temperature)
    print(f"vLLM vs Hugging Face forward: max abs difference of log-probs {max(diffs):.2e}")
    assert max(diffs) < TOL
    # Both paths ran: thoughts closed by a sampled </think> and thoughts closed by force.
    assert min(lengths) < max_new + 1 and max(lengths) == max_new + 1


@needs_vllm
def test_generate_and_score(engine, base, tok):
    model = base[0]
    prompts = [tok("Question: what is 4 + 12?")["input_ids"], tok("Answer: 2")["input_ids"]]
    stop = list(range(0, len(tok), 7))  # frequent enough that some rows stop and others run on
    out = engine.generate(prompts, n=5, max_new_tokens=6, temperature=1.0, stop=stop)
    reasons = set()
    for prompt, gens in zip(prompts, out):
        assert len(gens) == 5
        for gen in gens:
            reasons.add(gen.finish_reason)
            assert not set(gen.ids[:-1]) & set(stop)
            assert (gen.ids[-1] in stop) == (gen.finish_reason == "stop")
            assert gen.finish_reason == "stop" or len(gen.ids) == 6
            full = prompt + gen.ids
            expected = logprobs_of(model, full)[torch.arange(len(prompt) - 1, len(full) - 1), gen.ids]
            assert max_diff(gen.logprobs, expected) < TOL
    assert reasons == {"stop", "length"}
    # Greedy with the greedy token as the stop: every generation is that token, finished by "stop".
    first = logprobs_of(model, prompts[0])[-1].argmax().item()
    (gens,) = engine.generate(prompts[:1], n=2, max_new_tokens=6, temperature=0.0, stop=[first])
    assert [(g.ids, g.finish_reason) for g in gens] == [([first], "stop")] * 2

    sequences, targets = prompts + [[7]], [1, 2, 3]
    scores = engine.score(sequences, targets)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert max_diff(scores, TorchEngine(model).score(sequences, targets)) < TOL


@needs_vllm
def test_load_weights_in_place(engine, base, tok):
    model, _ = base
    other = llama(tok, seed=1)
    assert isinstance(engine, Engine) and engine.version == 0
    sequences, targets = [tok("Question: what is 5 + 15?")["input_ids"], tok("Answer: 8")["input_ids"]], [5, 6]
    before = engine.score(sequences, targets)
    try:
        with pytest.raises(RuntimeError, match="lacks"):  # strict: a partial state dict is refused
            engine.load_weights({k: v for k, v in other.state_dict().items() if "layers.1." not in k}, version=2)
        assert engine.version == 0
        engine.load_weights(other.state_dict(), version=3)
        assert engine.version == 3
        after = engine.score(sequences, targets)
        # The scores moved exactly as the Hugging Face forward's did.
        assert max_diff(before, TorchEngine(model).score(sequences, targets)) < TOL
        assert max_diff(after, TorchEngine(other).score(sequences, targets)) < TOL
        assert max_diff(after, before) > 1e-2
        # And sampling follows the new weights (the prefix cache from the old ones was dropped).
        think_open = tok.convert_tokens_to_ids("<think>")
        (group,) = engine.think([sequences[0]], [5], n=4, max_new_tokens=4, temperature=0.7, top_p=1.0,
                                think_open=think_open, think_close=tok.eos_token_id)
        for thought, logprobs in zip(group.thoughts, group.thought_logprobs):
            full = sequences[0] + [think_open] + thought
            expected = logprobs_of(other, full, 0.7)[torch.arange(len(sequences[0]), len(full) - 1), thought]
            assert max_diff(logprobs, expected) < TOL
    finally:
        engine.load_weights(model.state_dict(), version=0)


def test_the_learner_trains_a_hugging_face_llama(base, tok, tmp_path):
    """models/hf.py: the loss with aligned targets is Hugging Face's own shifted `labels` loss; the
    learner takes a step on a Llama (next-token and RLP terms) and counts its FLOPs."""
    from models.hf import flops_per_token, is_ponder, is_ttt, next_token_loss
    from rollout.rollouts import ThoughtSample
    from training.learner import Learner

    model, model_dir = base
    ids = torch.randint(5, len(tok), (2, 12))
    with torch.no_grad():
        loss = next_token_loss(model, ids[:, :-1], ids[:, 1:])
        assert loss.item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)
    assert not is_ponder(model) and not is_ttt(model)
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once, as the projection
    assert flops_per_token(model, 8) == 6.0 * params + 12.0 * 2 * 64 * 4.5

    cfg = load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["optim.warmup_steps=0", "train.steps=5"])
    think_open = tok.convert_tokens_to_ids("<think>")
    learner = Learner(cfg, str(model_dir), str(tmp_path / "run"), ids, torch.ones(len(tok), dtype=torch.long),
                      think_open, tok.pad_token_id)
    thought = [7, 8, tok.convert_tokens_to_ids("</think>")]
    sample = ThoughtSample(ids[0, :6].tolist(), thought, [-1.0, -2.0, -0.5], advantage=0.5, reward=0.1)
    metrics = learner.train_step([Rollouts(version=0, samples=[sample], rewards=[0.1])], ids)
    assert learner.version == 1 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "ttt/ilr" not in metrics and metrics["flops/total"] > 0 and metrics["rlp/samples"] == 1
    assert "eval/bpb" in learner.evaluate()


@pytest.mark.parametrize("settings, reason", [
    ({"num_attention_heads": 4}, r"head_dim=16.*at least 32"),
    ({"mode": "ttt_e2e", "mini_batch_size": 8, "cms_chunk_sizes": [8, 16]}, r"continuum memory.*one fast MLP"),
])
def test_what_vllm_cannot_serve_is_refused_naming_the_reason(tmp_path, settings, reason):
    config = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  suffix_len=1)
    PonderForCausalLM(PonderConfig(**{**config, **settings})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"cannot serve .*{reason}.*rollout\.engine=torch"):
        VLLMEngine(tmp_path)


@pytest.fixture(scope="module")
def ttt_base(tok, tmp_path_factory):
    """A tiny random TTT-E2E Ponder model on the same tokenizer (chunks of 8: a 25-token window and
    its thoughts cross several inner updates inside vLLM; inner lr 0.1, see test_vllm_ponder.py)."""
    torch.manual_seed(0)
    model = PonderForCausalLM(PonderConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        mode="ttt_e2e", sliding_window=16, suffix_len=1, mini_batch_size=8, ttt_inner_lr=0.1,
        max_position_embeddings=256, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4)
    path = tmp_path_factory.mktemp("ttt")
    model.save_pretrained(path)
    return model, path


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("which", ["base", "ttt_base"])
def test_two_rlp_steps_on_ray_with_a_vllm_worker(ray_cluster, which, tok, tmp_path, request):
    """A Llama, and a TTT-E2E Ponder model served by rollout/vllm_plugin (fast weights learning in vLLM)."""
    ray = ray_cluster
    from rollout.sync import ObjectStoreSync
    from rollout.worker import RolloutWorker
    from training.learner import Learner

    model, model_dir = request.getfixturevalue(which)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cfg = load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml",
                      ["rlp.group_size=3", "rlp.thought_max_tokens=5", "rlp.min_context=8", "data.seq_len=24",
                       "optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=10", "rollout.engine=vllm",
                       f"base={model_dir}"])
    learner = ray.remote(Learner).options(num_cpus=1).remote(
        cfg, str(model_dir), str(tmp_path / "run"), torch.randint(5, len(tok), (2, 25)),
        torch.ones(len(tok), dtype=torch.long), tok.convert_tokens_to_ids("<think>"), tok.pad_token_id)
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(str(model_dir), str(tok_dir), cfg.rlp, cfg.reward,
                                                                 0, "cpu", cfg.rollout.engine)
    windows = torch.randint(5, len(tok), (2, 25))
    sync = ObjectStoreSync(learner, [worker])
    for step in range(2):
        rollouts = ray.get(worker.rollout.remote(windows))
        assert rollouts.version == step and len(rollouts.rewards) == 2 * 3
        metrics = ray.get(learner.train_step.remote([rollouts], windows))
        assert metrics["rlp/samples"] == 6
        # Synchronous: the learner's log-probs of vLLM's thoughts are vLLM's own (ratio 1, no clip).
        assert metrics["rlp/ratio_mean"] == pytest.approx(1.0, abs=TOL) and metrics["rlp/clip_frac"] == 0
        sync.push()
    assert ray.get(learner.get_version.remote()) == ray.get(worker.__ray_call__.remote(lambda w: w.version)) == 2
    # The worker's vLLM now scores with the learner's weights, which moved away from the base.
    sequences, targets = [windows[0, :10].tolist(), windows[1, :7].tolist()], [3, 4]
    served = ray.get(worker.__ray_call__.remote(lambda w: w.policy.score(sequences, targets)))
    trained = ray.get(learner.__ray_call__.remote(lambda learner: last_logprobs(learner.model, sequences, targets)))
    assert max_diff(served, trained) < TOL
    assert max_diff(served, last_logprobs(model, sequences, targets)) > 1e-3
    # What an exact resume needs of the worker: with its generators' state back (positions, and
    # vLLM's per-request sampling seeds) and the same weights loaded (which empties vLLM's prefix
    # cache), it samples the same thoughts with the same log-probs and rewards; without, others.
    state = ray.get(worker.rng_state.remote())
    first = ray.get(worker.rollout.remote(windows))
    sync.push()
    ray.get(worker.set_rng_state.remote(state))
    again = ray.get(worker.rollout.remote(windows))
    sync.push()
    other = ray.get(worker.rollout.remote(windows))
    assert [(s.context, s.thought, s.old_logprobs) for s in again.samples] == [(s.context, s.thought, s.old_logprobs)
                                                                           for s in first.samples]
    assert again.rewards == first.rewards
    assert [s.thought for s in other.samples] != [s.thought for s in first.samples]
