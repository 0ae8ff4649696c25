"""The transformer: causality, sliding window, attention against its reference, save/load."""

import pytest
import torch

from kernels.attention import sliding_window_attention, sliding_window_attention_reference
from models import PonderConfig, PonderForCausalLM


def tiny(mode="full", **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               mode=mode, sliding_window=8)
    cfg.update(kw)
    return PonderForCausalLM(PonderConfig(**cfg)).eval()


@pytest.mark.parametrize("mode", ["full", "swa"])
def test_causality(mode):
    model = tiny(mode)
    x = torch.randint(0, 97, (2, 24))
    base = model(x).logits
    for j in (0, 7, 23):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 97
        changed = model(y).logits
        torch.testing.assert_close(changed[:, :j], base[:, :j], rtol=0, atol=0)
        assert not torch.allclose(changed[:, j], base[:, j])  # the change is visible from j on


def test_sliding_window_limits_context():
    model = tiny("swa", sliding_window=4, num_hidden_layers=1)
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 97
    diff = (model(x).logits - model(y).logits).abs().amax(-1)[0]
    # One layer with window 4: position i sees keys i-3..i, so token 2 reaches positions 2..5 only.
    assert (diff[2:6] > 0).all() and (diff[6:] == 0).all()


def test_window_at_least_sequence_equals_full_attention():
    x = torch.randint(0, 97, (2, 20))
    full = tiny("full")(x).logits
    swa = tiny("swa", sliding_window=20)(x).logits
    torch.testing.assert_close(swa, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 5, 64])
def test_attention_matches_reference(window):
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    out = sliding_window_attention(q, k, v, window)
    ref = sliding_window_attention_reference(q, k, v, window)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-10
    # Queries aligned to the last keys, as in a decode step with a cache.
    out_tail = sliding_window_attention(q[:, :, -3:], k, v, window)
    assert ((out_tail - ref[:, :, -3:]).norm() / ref[:, :, -3:].norm()).item() < 1e-10


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny("swa")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PonderForCausalLM and loaded.config.mode == "swa" and loaded.config.sliding_window == 8
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    # Tied embeddings: one tensor serves as input embedding and output projection.
    assert sum(p.numel() for p in loaded.parameters()) == model.num_params()


def test_loss_ignores_masked_targets():
    model = tiny()
    x = torch.randint(0, 97, (1, 10))
    targets = torch.roll(x, -1, 1)
    targets[:, 5:] = -100
    out = model(x, targets=targets)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :5], targets[0, :5])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("mode,tied", [("full", True), ("full", False), ("ttt_e2e", True), ("ttt_e2e", False)])
def test_think_tokens_added_to_a_ponder_model_keep_old_logits(mode, tied):
    """A Ponder model (a bridged one, say) whose tokenizer lacks <think>: the embedding (and an untied
    head) grow by the new rows, set to the mean of the old ones, and every old token's logits stay
    exactly. TTT-E2E: exactly within the first chunk; after it the inner loss's softmax spans the new
    tokens too, so the fast weights, and the logits, move a little."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from models.hf import THINK_TOKENS, add_think_tokens

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(["12 + 30 = 42, and 7 * 6 = 42."] * 4, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    model = PonderForCausalLM(PonderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, mode=mode, suffix_len=1, mini_batch_size=4,
                                           tie_word_embeddings=tied)).eval()
    ids = torch.tensor([tok("12 + 30 = 42")["input_ids"]])
    assert ids.shape[1] > 4
    with torch.no_grad():
        before = model(ids).logits
        added = add_think_tokens(model, tok)
        after = model(ids).logits
    assert added == tok.convert_tokens_to_ids(list(THINK_TOKENS)) and model.output_weight.shape[0] == len(tok)
    exact = 4 if mode == "ttt_e2e" else ids.shape[1]
    assert torch.equal(after[:, :exact, : before.shape[-1]], before[:, :exact])
    assert torch.allclose(after[..., : before.shape[-1]], before, atol=1e-2)
    assert torch.allclose(model.output_weight[added[0]], model.output_weight[: before.shape[-1]].mean(0))
    with torch.no_grad():  # the new tokens run through the model
        assert model(torch.tensor([[added[0], *ids[0].tolist(), added[1]]])).logits.shape[-1] == len(tok)
