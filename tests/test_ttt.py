"""TTT-E2E: the meta-gradient against finite differences, causality, learning from context,
per-sequence fast weights, decoding equivalence, save/load."""

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from tests.finite_differences import assert_meta_gradient_matches_finite_differences

V = 61


def ttt_model(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
               mode="ttt_e2e", sliding_window=8, mini_batch_size=4, suffix_len=2)
    cfg.update(kw)
    return PonderForCausalLM(PonderConfig(**cfg)).to(dtype)


def next_tokens(x):
    return torch.cat([x[:, 1:], torch.randint(0, V, (x.shape[0], 1))], 1)


@pytest.mark.parametrize("masked", [False, True])
def test_meta_gradient_matches_finite_differences_float64(masked):
    model = ttt_model(torch.float64)
    model.inner_lr = 0.5
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 14))  # chunks of 4: three inner updates reach the last chunk
    y = next_tokens(x)
    if masked:  # a masked target mid-chunk, a whole masked chunk, and one in the partial last chunk
        y[0, 1], y[1, 4:8], y[1, 12] = -100, -100, -100
    params = {
        "W_0 (fast w1, last block)": model.blocks[3].fast_mlp.f.w1.weight,
        "W_0 (fast w2, first suffix block)": model.blocks[2].fast_mlp.f.w2.weight,
        "slow: prefix attention wq": model.blocks[0].attn.f.wq.weight,
        "slow: suffix static MLP w3": model.blocks[2].mlp.f.w3.weight,
        "slow: suffix attention post-norm": model.blocks[3].attn.post_norm.weight,
        "slow: embedding": model.embed.weight,
    }
    assert_meta_gradient_matches_finite_differences(model, x, y, params)


def test_first_order_gradient_differs_from_second_order():
    x = torch.randint(0, V, (2, 16))
    y = next_tokens(x)
    grads = {}
    for order in ("second_order", "first_order"):
        model = ttt_model(torch.float64, ttt_grad=order)
        model(x, targets=y).loss.backward()
        grads[order] = model.blocks[0].attn.f.wq.weight.grad.clone()
    rel = (grads["first_order"] - grads["second_order"]).norm() / grads["second_order"].norm()
    assert rel > 1e-3  # the gradient-of-gradient terms are really there


def test_token_causality_through_the_inner_loop():
    model = ttt_model().eval()
    x = torch.randint(0, V, (2, 22))
    with torch.no_grad():
        base = model(x).logits
        for j in (3, 4, 9, 21):  # inside a chunk, at a chunk boundary, later chunks
            z = x.clone()
            z[:, j] = (z[:, j] + 1) % V
            changed = model(z).logits
            torch.testing.assert_close(changed[:, :j], base[:, :j], rtol=0, atol=0)
            assert not torch.allclose(changed[:, j:], base[:, j:])


def test_inner_loop_learns_from_context():
    torch.manual_seed(3)
    doc = torch.randint(0, V, (8, 48))
    x = torch.cat([doc, doc], 1)  # the window (8) cannot reach back to the first copy
    y = next_tokens(x)
    losses = {}
    for lr in (0.0, 1.0):
        model = ttt_model(mini_batch_size=8, sliding_window=8).eval()
        model.inner_lr = lr
        with torch.no_grad():
            logits = model(x).logits
        second = torch.nn.functional.cross_entropy(logits[:, 48:-1].flatten(0, 1), y[:, 48:-1].flatten())
        losses[lr] = second.item()
    print(f"second-copy loss without TTT {losses[0.0]:.4f}, with TTT {losses[1.0]:.4f}")
    # An untrained model: the fast weights alone, trained on the first copy, lower the loss on
    # the second by about 2% (a meta-trained W_0 does far better; see the pretraining test).
    assert losses[1.0] < 0.99 * losses[0.0]


def test_sequences_do_not_share_fast_weights():
    model = ttt_model().eval()
    x = torch.randint(0, V, (3, 17))
    with torch.no_grad():
        together = model(x).logits
        alone = model(x[1:2]).logits
        other = x.clone()
        other[0] = torch.randint(0, V, (17,))
        other[2] = torch.randint(0, V, (17,))
        changed_neighbours = model(other).logits
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(changed_neighbours[1], together[1], rtol=1e-5, atol=1e-5)


def decode_in_pieces(model, x, pieces, copy_at=None):
    """The logits of x read piece by piece through one decoding state, and that state; from the
    piece holding position `copy_at` on, an expanded copy of the state reads on instead."""
    state = model.new_state(x.shape[0])
    parts, i = [], 0
    for n in pieces:
        parts.append(model(x[:, i : i + n], state=state).logits)
        if copy_at is not None and i < copy_at <= i + n:
            state = state.expand(1)
        i += n
    return parts, state


@pytest.mark.parametrize("pieces", [[1] * 23, [5, 1, 1, 7, 9], [8, 8, 7], [23]])
def test_decoding_matches_the_training_forward(pieces):
    model = ttt_model().eval()
    x = torch.randint(0, V, (2, 23))
    with torch.no_grad():
        full = model(x).logits
        parts, state = decode_in_pieces(model, x, pieces)
    # The cache stays O(window): sliding window plus at most one pending chunk.
    assert all(k.shape[2] <= 8 + 4 for k, _ in state.kv)
    assert state.pos == 23
    stepped = torch.cat(parts, 1)
    rel = (stepped - full).norm() / full.norm()
    assert rel < 1e-5, rel


def test_decoding_without_updates_keeps_fast_weights():
    model = ttt_model().eval()
    x = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        state = model.new_state(1)
        model(x[:, :8], state=state)
        before = [w.clone() for w in state.fast[0]]
        state.learn = False
        for t in range(8, 20):
            model(x[:, t : t + 1], state=state)
    for a, b in zip(before, state.fast[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_expanded_state_continues_like_the_original():
    model = ttt_model().eval()
    x = torch.randint(0, V, (2, 10))
    nxt = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        state = model.new_state(2)
        model(x, state=state)
        many = state.expand(3)
        out_many = model(nxt.repeat_interleave(3, 0), state=many).logits
        out_one = model(nxt, state=state).logits
    torch.testing.assert_close(out_many[::3], out_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_many[1::3], out_one, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ttt_model().eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mode == "ttt_e2e" and loaded.n_prefix == 2
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "125m", "350m", "760m", "1b", "3b"])
def test_ttt_parameter_count_matches_the_plain_model(name):
    import dataclasses

    from training.config import CONFIG_DIR, PretrainConfig, load_config

    counts = {}
    for mode in ("full", "ttt_e2e"):
        cfg = load_config(PretrainConfig, CONFIG_DIR / "ttt_pretrain.yaml", [f"model={name}", f"model.mode={mode}"]).model
        fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name",)}
        fields["vocab_size"] = fields["vocab_size"] or 4096
        with torch.device("meta"):
            counts[mode] = PonderForCausalLM(PonderConfig(**fields)).num_params()
    assert abs(counts["ttt_e2e"] - counts["full"]) / counts["full"] < 0.02, counts


@pytest.mark.parametrize("levels", [[], [4, 8]], ids=["ttt_e2e", "cms"])
def test_recompute_per_chunk_gives_the_same_gradients(levels):
    x = torch.randint(0, V, (2, 16))
    y = next_tokens(x)
    grads = {}
    for recompute in (False, True):
        model = ttt_model(torch.float64, ttt_recompute=recompute, cms_chunk_sizes=levels)
        model(x, targets=y).loss.backward()
        grads[recompute] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-10, atol=1e-12)


def test_masked_target_teaches_the_fast_weights_nothing():
    """The target of chunk 1's last position is the first token of chunk 2. Masked, changing that
    token (which chunk 1 does not read) changes neither chunk 1's loss nor its inner update."""
    model = ttt_model(torch.float64).eval()
    b = model.config.mini_batch_size
    torch.manual_seed(4)
    x = torch.randint(0, V, (2, 11))
    z = x.clone()
    z[:, b] = (z[:, b] + 1) % V

    def after_chunk_1(ids, mask):
        targets = next_tokens(ids)
        if mask:
            targets[:, b - 1] = -100
        with torch.no_grad():
            state = model.new_state(2)
            logits = model(ids[:, : b + 1], targets=targets[:, : b + 1], state=state).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :b].flatten(0, 1), targets[:, :b].flatten(), ignore_index=-100)
        return loss, [w for layer in state.fast for w in layer]

    for mask in (True, False):
        (loss_x, fast_x), (loss_z, fast_z) = after_chunk_1(x, mask), after_chunk_1(z, mask)
        same = all(torch.equal(a, c) for a, c in zip(fast_x, fast_z))
        if mask:
            assert same and torch.equal(loss_x, loss_z)
        else:  # the check can fail: unmasked, the same change does move W_1 and the loss
            assert not same and not torch.equal(loss_x, loss_z)


def test_chunk_mean_loss_matches_a_hand_written_reference():
    from models.ttt import chunk_mean_loss

    torch.manual_seed(5)
    B, T, b = 3, 11, 4  # chunks [0, 4), [4, 8), [8, 11): the last one partial
    logits = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    targets[0, 2], targets[1, 8:], targets[2, 9] = -100, -100, -100  # row 1's last chunk fully masked

    def reference(first: int):
        """Positions first..T-1, chunks cut at multiples of b."""
        rows = []
        for r in range(B):
            bounds = [first] + list(range((first // b + 1) * b, T, b)) + [T]
            chunk_losses = []
            for s, e in zip(bounds[:-1], bounds[1:]):
                nll = [-torch.log_softmax(logits[r, t], -1)[targets[r, t]] for t in range(s, e) if targets[r, t] != -100]
                chunk_losses.append(sum(nll) / len(nll) if nll else torch.tensor(0.0, dtype=torch.float64))
            rows.append(sum(chunk_losses) / len(chunk_losses))
        return sum(rows) / B

    torch.testing.assert_close(chunk_mean_loss(logits, targets, b), reference(0), rtol=1e-12, atol=1e-12)
    token_mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(token_mean - reference(0)) > 1e-3  # the two averages really differ here
    # Read from position 2 on (decoding): chunks stay aligned to absolute positions 0, 4, 8, ...
    torch.testing.assert_close(chunk_mean_loss(logits[:, 2:], targets[:, 2:], b, start=2), reference(2),
                               rtol=1e-12, atol=1e-12)


def test_loss_average_follows_the_mode_unless_asked():
    assert ttt_model().config.loss_average == "chunk"
    assert ttt_model(mode="swa").config.loss_average == "token"
    assert ttt_model(mode="full", loss_average="chunk").config.loss_average == "chunk"
    x = torch.randint(0, V, (2, 14))
    y = next_tokens(x)
    y[0, 3] = -100
    chunk, token = ttt_model(), ttt_model(loss_average="token")
    with torch.no_grad():
        a, c = chunk(x, targets=y), token(x, targets=y)
    torch.testing.assert_close(a.logits, c.logits, rtol=0, atol=0)
    ce = torch.nn.functional.cross_entropy(c.logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(c.loss, ce)
    assert abs(a.loss - c.loss) > 1e-6


@pytest.mark.parametrize("pieces", [[1] * 23, [5, 1, 1, 7, 9], [8, 8, 7], [16, 7]])
def test_decoding_with_masked_targets_matches_the_training_forward(pieces):
    """A prompt read with masked targets (given per piece), then decoded on without targets."""
    model = ttt_model().eval()
    torch.manual_seed(6)
    x = torch.randint(0, V, (2, 23))
    y = next_tokens(x)
    y[0, 3], y[1, 7], y[:, 10], y[1, 15] = -100, -100, -100, -100
    prompt = 16  # pieces that end within the prompt carry targets; later ones read tokens only
    read = next_tokens(x)  # what the pieces without targets learn from
    with torch.no_grad():
        state = model.new_state(2)
        parts, i = [], 0
        for n in pieces:
            if i + n <= prompt:
                parts.append(model(x[:, i : i + n], targets=y[:, i : i + n], state=state).logits)
                read[:, i : i + n] = y[:, i : i + n]
            else:
                parts.append(model(x[:, i : i + n], state=state).logits)
            i += n
        full = model(x, targets=read).logits
        unmasked = model(x, targets=next_tokens(x)).logits
    stepped = torch.cat(parts, 1)
    rel = (stepped - full).norm() / full.norm()
    assert rel < 1e-5, rel
    assert (unmasked - full).norm() / full.norm() > 1e-4  # the masks changed what was learned
