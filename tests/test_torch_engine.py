"""The torch rollout engine: thoughts and their scores against independent full forwards (the
shared-context state path is exact, TTT-E2E fast weights included), the context read once,
sampling, generation, scoring, weight loading."""

import pytest
import torch
import torch.nn.functional as F

from models import PonderConfig, PonderForCausalLM
from rollout import Engine, TorchEngine
from rollout.torch_engine import sample_next

V = 50
OPEN = 48  # <think>; contexts use ids below it
MODES = ["full", "swa", "ttt_e2e"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(mode="full", seed=0):
    """A tiny random model. Its embeddings are scaled up so next-token distributions are sharp
    enough for a chosen </think> to be sampled often (some thoughts close, others run to the limit).
    Window 8 and chunks of 4 make short contexts cross window and chunk boundaries."""
    torch.manual_seed(seed)
    model = PonderForCausalLM(PonderConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                           intermediate_size=64, mode=mode, sliding_window=8, mini_batch_size=4,
                                           suffix_len=2)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(10)
    return model


def random_ids(n, seed):
    return torch.randint(0, OPEN, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def logprobs_of(model, ids):
    """Log-softmax of one forward over the whole sequence, [T, V]."""
    return F.log_softmax(model(torch.tensor([ids])).logits[0], -1)


def assert_close(actual, expected):
    """float32 agreement; batching contexts changes matmul reduction order, which TTT-E2E's inner
    updates (on embeddings scaled by 10) carry to ~2e-5."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_think_matches_independent_forwards(mode):
    model = tiny(mode)
    # 8: the context ends a TTT chunk; the two of length 8 are read and decoded in one batch.
    contexts = [random_ids(8, 1), random_ids(5, 2), random_ids(13, 3), random_ids(8, 4)]
    next_tokens = [3, 17, 41, 9]
    # </think> := the most likely token after the first context's <think>, so some thoughts stop early.
    close = logprobs_of(model, contexts[0] + [OPEN])[-1, :OPEN].argmax().item()
    temperature, max_new = 0.5, 6
    groups = TorchEngine(model, seed=0).think(contexts, next_tokens, n=8, max_new_tokens=max_new,
                                              temperature=temperature, top_p=0.95, think_open=OPEN, think_close=close)
    assert len(groups) == 4
    lengths = []
    for context, next_token, group in zip(contexts, next_tokens, groups):
        assert_close(group.logp_next_no_thought, logprobs_of(model, context)[-1, next_token])
        assert len(group.thoughts) == len(group.thought_logprobs) == len(group.logp_next_with_thought) == 8
        for thought, thought_logprobs, with_thought, truncated in zip(
                group.thoughts, group.thought_logprobs, group.logp_next_with_thought, group.truncated):
            assert thought[-1] == close and close not in thought[:-1]
            assert len(thought) <= max_new + 1 and len(thought_logprobs) == len(thought)
            assert truncated == (len(thought) == max_new + 1)
            lengths.append(len(thought))
            full = context + [OPEN] + thought
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0]
            # Thought token u is predicted at the position before it: <think> for the first one.
            positions = torch.arange(len(context), len(full) - 1)
            expected = F.log_softmax(logits[positions] / temperature, -1)[torch.arange(len(thought)), thought]
            assert_close(thought_logprobs, expected)
            assert_close(with_thought, F.log_softmax(logits[-1], -1)[next_token])
    # Both paths ran: thoughts that closed early beside others that kept decoding, and forced closes.
    assert min(lengths) < max_new + 1 and max(lengths) == max_new + 1


@pytest.mark.parametrize("mode", MODES)
def test_think_reads_each_context_once(mode):
    model = tiny(mode)
    engine = TorchEngine(model, seed=0)
    fed = []
    forward = model.forward

    def counting_forward(input_ids, *args, **kwargs):
        fed.append(input_ids.tolist())
        return forward(input_ids, *args, **kwargs)

    model.forward = counting_forward
    contexts = [random_ids(9, 4), random_ids(6, 5)]
    engine.think(contexts, [1, 2], n=4, max_new_tokens=5, temperature=1.0, top_p=1.0, think_open=OPEN, think_close=49)
    # Per context: the context once (batch 1), <think> once (batch 1), then one token per thought.
    prefills = [ids for ids in fed if len(ids[0]) > 1]
    assert prefills == [[c] for c in contexts]
    assert [ids for ids in fed if len(ids) == 1 and len(ids[0]) == 1] == [[[OPEN]]] * len(contexts)
    steps = [ids for ids in fed if len(ids[0]) == 1 and len(ids) != 1]
    assert steps and all(len(ids) == 4 for ids in steps)
    assert len(fed) == len(prefills) + len(contexts) + len(steps)


def test_think_without_fast_weight_updates_during_decode():
    model = tiny("ttt_e2e")
    model.config.ttt_update_during_decode = False
    context = random_ids(10, 15)
    (group,) = TorchEngine(model, seed=0).think([context], [9], n=4, max_new_tokens=7, temperature=1.0, top_p=1.0,
                                                think_open=OPEN, think_close=49)
    assert_close(group.logp_next_no_thought, logprobs_of(model, context)[-1, 9])
    for thought, thought_logprobs, with_thought in zip(group.thoughts, group.thought_logprobs,
                                                       group.logp_next_with_thought):
        # Reference: the context read with learning on, then the thought fed with it off.
        with torch.no_grad():
            state = model.new_state(1)
            logits = [model(torch.tensor([context]), state=state).logits[0, -1:]]
            state.learn = False
            for token in [OPEN] + thought:
                logits.append(model(torch.tensor([[token]]), state=state).logits[0])
        logprobs = F.log_softmax(torch.cat(logits[1:]), -1)
        assert_close(thought_logprobs, logprobs[torch.arange(len(thought)), thought])
        assert_close(with_thought, logprobs[-1, 9])
    # The context ends mid-chunk and thoughts cross chunk boundaries: the full forward, which
    # keeps learning, differs.
    full = context + [OPEN] + group.thoughts[0]
    assert abs(group.logp_next_with_thought[0] - logprobs_of(model, full)[-1, 9].item()) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_greedy_think(mode):
    model = tiny(mode)
    context = random_ids(7, 6)
    greedy = logprobs_of(model, context + [OPEN])[-1].argmax().item()
    engine = TorchEngine(model)
    # Greedy and </think> is the argmax: every thought is just </think>, sampled, not forced.
    (group,) = engine.think([context], [5], n=3, max_new_tokens=4, temperature=0.0, top_p=1.0,
                            think_open=OPEN, think_close=greedy)
    assert group.thoughts == [[greedy]] * 3 and group.truncated == [False] * 3
    assert_close(group.thought_logprobs, [[logprobs_of(model, context + [OPEN])[-1, greedy]]] * 3)
    # Greedy with an unlikely </think>: identical thoughts along the argmax path, closed by force
    # unless the path reaches </think> on its own.
    close = logprobs_of(model, context + [OPEN])[-1].argmin().item()
    (group,) = engine.think([context], [5], n=3, max_new_tokens=4, temperature=0.0, top_p=1.0,
                            think_open=OPEN, think_close=close)
    thought, forced = group.thoughts[0], group.truncated[0]
    assert group.thoughts == [thought] * 3 and thought[-1] == close
    argmax_path = logprobs_of(model, context + [OPEN] + thought)[len(context):-1].argmax(-1).tolist()
    sampled = len(thought) - forced
    assert thought[:sampled] == argmax_path[:sampled] and (not forced or len(thought) == 5)


@pytest.mark.parametrize("top_p", [1e-6, 0.0])
def test_sample_next_greedy_and_tiny_top_p(top_p):
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    expected = F.log_softmax(logits, -1).gather(-1, best[:, None]).squeeze(-1)
    token, logprob = sample_next(logits, 0.0, 1.0)
    assert torch.equal(token, best)
    assert_close(logprob, expected)
    # A tiny nucleus keeps the top token only; its log-prob is the untruncated one, at the temperature.
    token, logprob = sample_next(logits, 0.7, top_p, torch.Generator().manual_seed(1))
    assert torch.equal(token, best)
    assert_close(logprob, F.log_softmax(logits / 0.7, -1).gather(-1, best[:, None]).squeeze(-1))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.7)])
def test_sample_next_follows_the_distribution(temperature, top_p):
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    logits = probs.log().repeat(4000, 1)
    token, logprob = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(0))
    expected = F.softmax(probs.log() / temperature, -1)
    assert_close(logprob, expected.log()[token])
    if top_p < 1:  # the nucleus of [0.5, 0.3, 0.15, 0.05] at 0.7 is {0.5, 0.3}
        assert set(token.tolist()) <= {2, 3}
        expected = torch.tensor([0.0, 0.0, 0.3, 0.5]) / 0.8
    counts = torch.bincount(token, minlength=4).float()
    keep = expected > 0
    chi2 = ((counts - 4000 * expected)[keep] ** 2 / (4000 * expected)[keep]).sum().item()
    assert chi2 < 20, (counts, expected)  # 3 degrees of freedom: p < 0.001 above 16.3


def test_sampling_is_reproducible_given_the_seed():
    model = tiny("ttt_e2e")
    prompts = [random_ids(6, 7)]

    def sample(seed):
        return TorchEngine(model, seed=seed).generate(prompts, n=4, max_new_tokens=8, temperature=1.0)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


@pytest.mark.parametrize("mode", MODES)
def test_generate(mode):
    model = tiny(mode)
    engine = TorchEngine(model, seed=0)
    prompts = [random_ids(10, 9), random_ids(3, 8), random_ids(10, 13)]  # two of one length: one batch
    stop = list(range(0, V, 7))  # frequent enough that some rows stop and others run on
    out = engine.generate(prompts, n=5, max_new_tokens=6, temperature=1.0, stop=stop)
    assert len(out) == 3 and all(len(gens) == 5 for gens in out)
    reasons = set()
    for prompt, gens in zip(prompts, out):
        for gen in gens:
            reasons.add(gen.finish_reason)
            assert not set(gen.ids[:-1]) & set(stop)
            if gen.finish_reason == "stop":
                assert gen.ids[-1] in stop and len(gen.ids) <= 6
            else:
                assert len(gen.ids) == 6 and gen.ids[-1] not in stop
            full = prompt + gen.ids
            assert_close(gen.logprobs, logprobs_of(model, full)[torch.arange(len(prompt) - 1, len(full) - 1),
                                                                  torch.tensor(gen.ids)])
    assert reasons == {"stop", "length"}
    # Greedy with the greedy token as the stop: every generation is that token, finished by "stop".
    greedy = engine.generate(prompts, n=1, max_new_tokens=6, temperature=0.0)
    assert [g[0].ids for g in greedy] == [engine.generate([p], 1, 6, 0.0)[0][0].ids for p in prompts]
    first = logprobs_of(model, prompts[0])[-1].argmax().item()
    (gens,) = engine.generate(prompts[:1], n=2, max_new_tokens=6, temperature=0.0, stop=[first])
    assert [(g.ids, g.finish_reason) for g in gens] == [([first], "stop")] * 2
    (gens,) = engine.generate(prompts[:1], n=2, max_new_tokens=4, temperature=0.0)
    assert all(len(g.ids) == 4 and g.finish_reason == "length" for g in gens)


@pytest.mark.parametrize("mode", MODES)
def test_score_matches_the_forward(mode):
    model = tiny(mode)
    sequences = [random_ids(3, 10), random_ids(14, 11), random_ids(8, 12), [7]]
    targets = [1, 2, 3, 4]
    scores = TorchEngine(model).score(sequences, targets)
    assert scores.shape == (4,)
    assert_close(scores, [logprobs_of(model, s)[-1, t] for s, t in zip(sequences, targets)])


def test_load_weights():
    engine = TorchEngine(tiny("ttt_e2e", seed=0))
    assert isinstance(engine, Engine) and engine.version == 0
    other = tiny("ttt_e2e", seed=1)
    sequences, targets = [random_ids(9, 13), random_ids(4, 14)], [5, 6]
    assert not torch.allclose(engine.score(sequences, targets), TorchEngine(other).score(sequences, targets))
    engine.load_weights(other.state_dict(), version=3)
    assert engine.version == 3
    assert_close(engine.score(sequences, targets), [logprobs_of(other, s)[-1, t] for s, t in zip(sequences, targets)])
    with pytest.raises(RuntimeError):  # strict: a partial state dict is refused
        engine.load_weights({k: v for k, v in other.state_dict().items() if k != "embed.weight"}, version=4)


@pytest.mark.parametrize("mode", MODES)
def test_contexts_of_one_length_are_read_and_decoded_together(mode):
    model = tiny(mode)
    fed = []
    forward = model.forward

    def counting_forward(input_ids, *args, **kwargs):
        fed.append(input_ids.shape)
        return forward(input_ids, *args, **kwargs)

    contexts = [random_ids(9, s) for s in range(5)] + [random_ids(6, 9)]
    kw = dict(n=3, max_new_tokens=4, temperature=0.0, top_p=1.0, think_open=OPEN, think_close=49)
    alone = [TorchEngine(model, seed=0).think([c], [i], **kw)[0] for i, c in enumerate(contexts)]
    model.forward = counting_forward
    together = TorchEngine(model, seed=0).think(contexts, list(range(len(contexts))), **kw)
    prefills = sorted(tuple(shape) for shape in fed if shape[1] > 1)
    assert prefills == [(1, 6), (5, 9)]  # one prefill per length
    assert max(shape[0] for shape in fed) == 5 * 3  # one decode batch of B·n rows
    for a, b in zip(alone, together):  # greedy: the batch changes nothing
        assert a.thoughts == b.thoughts and a.truncated == b.truncated
        assert_close(b.thought_logprobs[0], a.thought_logprobs[0])
        assert_close(b.logp_next_with_thought, a.logp_next_with_thought)
        assert_close(b.logp_next_no_thought, a.logp_next_no_thought)
