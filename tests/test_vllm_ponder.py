"""vLLM serving Ponder's own models (rollout/vllm_plugin), against the torch engine and the Ponder
forward on the same weights: full attention, sliding window, and TTT-E2E with one and with two
suffix blocks, whose per-sequence fast weights learn from every chunk of mini_batch_size tokens
inside vLLM (or, with ttt_update_during_decode=false, from the context's chunks only).

One vLLM engine per mode (each takes about half a minute to start on a CPU), all tests of a mode
on it. Prompts cross several chunk and window boundaries, and the engines run with a small
max_num_batched_tokens, so long prompts are read in prefill pieces, which the token budget ends
inside chunks (TTT-E2E's scheduler ends them at chunk boundaries at the latest); prefix caching is on (the vLLM engine's default), and thoughts are sampled n at a time.
Measured differences of log-probs in float32: at most 2e-6; the tolerance is 1e-4.
"""

import importlib.util

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from rollout import TorchEngine
from rollout.vllm_engine import VLLMEngine
from tests.test_vllm_engine import logprobs_of, max_diff, thought_diffs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]
TOL = 1e-4
CHUNK = 8  # TTT-E2E's mini_batch_size: a 70-token prompt crosses 8 inner updates
VOCAB = 200


def ponder(mode: str, seed: int) -> PonderForCausalLM:
    """`mode`: full, swa, ttt_e2e (one suffix block of two) or ttt_e2e_suffix2 (two of three)."""
    """A tiny random Ponder model (head dim 32: vLLM's CPU attention refuses 16), its embeddings
    scaled up so that next-token distributions are far from uniform and the inner loop moves.
    Inner lr 0.1: at 1.0 this random model's inner loop is chaotic over a few hundred tokens
    (float32 and float64 forwards of it part by 2.3 nats at 300 tokens), at 0.1 they agree to 2e-6."""
    torch.manual_seed(seed)
    suffix = 2 if mode == "ttt_e2e_suffix2" else 1
    config = PonderConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1 + suffix, num_attention_heads=2,
                          intermediate_size=128, mode=mode.removesuffix("_suffix2"), sliding_window=16,
                          suffix_len=suffix, mini_batch_size=CHUNK, ttt_inner_lr=0.1, max_position_embeddings=512)
    model = PonderForCausalLM(config).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4)
    return model


@pytest.fixture(scope="module", params=["full", "swa", "ttt_e2e", "ttt_e2e_suffix2"])
def served(request, tmp_path_factory):
    """(mode, the Ponder model, a vLLM engine serving it): one engine at a time."""
    model = ponder(request.param, seed=0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    # 28 tokens per step: prefills of long prompts are cut inside chunks (chunked prefill).
    engine = VLLMEngine(str(path), seed=0, dtype="float32", max_model_len=400, max_num_batched_tokens=28,
                        disable_log_stats=False)  # prefix cache hits counted
    yield request.param, model, engine
    engine.close()


def random_ids(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def prompt_logprobs(engine, prompts):
    """vLLM's log-prob of every prompt token after the first, per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine._temperature(1.0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [[step[t].logprob for step, t in zip(out.prompt_logprobs[1:], p[1:])] for out, p in zip(outs, prompts)]


def test_prompt_logprobs_and_scores_equal_the_torch_engine(served):
    mode, model, engine = served
    prompts = random_ids([70, 45, 9, 23])
    diffs = []
    for prompt, served_lps in zip(prompts, prompt_logprobs(engine, prompts)):
        expected = logprobs_of(model, prompt)[torch.arange(len(prompt) - 1), prompt[1:]]
        diffs.append(max_diff(served_lps, expected))
    targets = [5, 6, 7, 8]
    scores = engine.score(prompts, targets)
    diffs.append(max_diff(scores, TorchEngine(model).score(prompts, targets)))
    print(f"{mode}: vLLM vs torch, max abs difference of log-probs {max(diffs):.2e}")
    assert max(diffs) < TOL
    if mode.startswith("ttt_e2e"):  # the fast weights did learn: frozen at W_0 the scores differ
        frozen = ponder(mode, seed=0)
        frozen.inner_lr = 0.0
        assert max_diff(scores, TorchEngine(frozen).score(prompts, targets)) > 1e-3


def test_thoughts_and_their_scores(served):
    """n thoughts per context; each thought's log-probs (at the sampling temperature, before
    top-p) equal the Ponder forward's over context + <think> + thought, which with TTT-E2E keeps
    learning through the thought; the next-token scores equal the torch engine's."""
    mode, model, engine = served
    contexts = random_ids([30, 15, 41], seed=2)
    think_open, next_tokens = 3, [5, 17, 41]
    # </think> := the most likely token after the first context's <think>, so some thoughts stop early.
    close = logprobs_of(model, contexts[0] + [think_open])[-1].argmax().item()
    temperature, max_new = 0.7, 12
    groups = engine.think(contexts, next_tokens, n=4, max_new_tokens=max_new, temperature=temperature, top_p=0.9,
                          think_open=think_open, think_close=close)
    diffs, lengths = thought_diffs(model, groups, contexts, next_tokens, 4, think_open, close, max_new, temperature)
    print(f"{mode}: thoughts, max abs difference of log-probs {max(diffs):.2e}; lengths {sorted(lengths)}")
    assert max(diffs) < TOL
    assert max(lengths) > CHUNK  # some thought crossed a chunk boundary while decoding


def test_weights_loaded_in_place(served):
    mode, model, engine = served
    other = ponder(mode, seed=1)
    prompts, targets = random_ids([50, 12], seed=3), [5, 6]
    before = engine.score(prompts, targets)
    try:
        engine.load_weights(other.state_dict(), version=4)
        assert engine.version == 4
        after = engine.score(prompts, targets)
        assert max_diff(after, TorchEngine(other).score(prompts, targets)) < TOL
        assert max_diff(after, before) > 1e-2
    finally:
        engine.load_weights(model.state_dict(), version=0)


def test_n_samples_of_a_long_prompt(served):
    """n > 1: vLLM runs n child requests, each prefilling what the prefix cache does not hold;
    every sample's log-probs equal the Ponder forward over prompt + sample."""
    mode, model, engine = served
    (prompt,) = random_ids([290], seed=5)
    (samples,) = engine.generate([prompt], n=3, max_new_tokens=12, temperature=1.0)
    diffs = [max_diff(g.logprobs, logprobs_of(model, prompt + g.ids)[torch.arange(len(prompt) - 1, len(prompt) - 1 +
                                                                                  len(g.ids)), g.ids])
             for g in samples]
    print(f"{mode}: n=3 samples, max abs difference of log-probs {max(diffs):.2e}")
    assert len(samples) == 3 and max(diffs) < TOL
    assert len({tuple(g.ids) for g in samples}) > 1


def prefix_cache_hits(engine) -> float:
    return sum(m.value for m in engine.llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def test_prefix_cache(served):
    """A sequence that shares a long prefix with one read before starts from the cached blocks
    (with TTT-E2E: from the fast weights and pending chunk vLLM stored at a block boundary)."""
    mode, model, engine = served
    (shared,) = random_ids([300], seed=4)
    sequences, targets = [shared + [7, 8, 9], shared + [10, 11]], [5, 6]
    engine.llm.reset_prefix_cache()
    engine.score(sequences[:1], targets[:1])
    hits = prefix_cache_hits(engine)
    second = engine.score(sequences[1:], targets[1:])
    assert prefix_cache_hits(engine) > hits
    assert max_diff(second, TorchEngine(model).score(sequences[1:], targets[1:])) < TOL


def frozen_after_context(model, context, rest, temperature=1.0):
    """The Ponder model's log-probs [len(rest), V] for `rest` read after `context`, its fast
    weights learning from the context only (the torch engine's ttt_update_during_decode=false)."""
    with torch.no_grad():
        state = model.new_state(1)
        last = model(torch.tensor([context]), state=state).logits[0, -1:]
        state.learn = False
        logits = torch.cat([last, model(torch.tensor([rest]), state=state).logits[0, :-1]])
    return torch.log_softmax(logits.float() / temperature, -1)


def test_fast_weights_learn_from_contexts_only(tmp_path):
    """ttt_update_during_decode=false, two suffix blocks: thoughts and the scores after them
    equal the Ponder model's with learning stopped at the context's end (the vLLM engine tells
    vLLM where each context ends), and differ from a model that keeps learning."""
    model = ponder("ttt_e2e_suffix2", seed=0)
    model.config.ttt_update_during_decode = False
    model.save_pretrained(tmp_path)
    engine = VLLMEngine(str(tmp_path), seed=0, dtype="float32", max_model_len=400, max_num_batched_tokens=28)
    try:
        contexts, next_tokens, think_open = random_ids([32, 21], seed=6), [5, 17], 3
        close = logprobs_of(model, contexts[0] + [think_open])[-1].argmax().item()
        groups = engine.think(contexts, next_tokens, n=3, max_new_tokens=20, temperature=0.7, top_p=1.0,
                              think_open=think_open, think_close=close)
        diffs, learning = [], []
        for context, target, group in zip(contexts, next_tokens, groups):
            diffs.append(max_diff(group.logp_next_no_thought, logprobs_of(model, context)[-1, target]))
            for thought, lps, with_thought in zip(group.thoughts, group.thought_logprobs, group.logp_next_with_thought):
                rest = [think_open] + thought
                expected = frozen_after_context(model, context, rest, 0.7)[torch.arange(1, len(rest)), thought]
                diffs.append(max_diff(lps, expected))
                diffs.append(max_diff(with_thought, frozen_after_context(model, context, rest + [target])[-1, target]))
                keeps_learning = logprobs_of(model, context + rest, 0.7)[torch.arange(len(context), len(context) +
                                                                                       len(thought)), thought]
                learning.append(max_diff(lps, keeps_learning))
        (prompt,) = random_ids([70], seed=7)  # all context: learns from every chunk
        diffs.append(max_diff(engine.score([prompt], [5]), logprobs_of(model, prompt)[-1, 5]))
        print(f"learning from contexts only: max abs difference {max(diffs):.2e}; against a model that keeps "
              f"learning {max(learning):.2e}")
        assert max(diffs) < TOL
        assert max(learning) > 1e-3
    finally:
        engine.close()
