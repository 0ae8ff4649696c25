"""Memory across windows: a long document streamed through consecutive windows with the state
carried equals one forward over the whole document; without it every window starts afresh."""

import pytest
import torch
import torch.nn.functional as F

from models import PonderConfig, PonderForCausalLM
from training.evaluate import heldout_bpb
from training.long_context import log_buckets, stream_losses

V = 61
MODES = {
    "full": dict(mode="full"),
    "swa": dict(mode="swa"),
    "ttt_e2e": dict(mode="ttt_e2e"),
    "cms": dict(mode="ttt_e2e", cms_chunk_sizes=[4, 8, 16], cms_inner_lrs=[0.5, 0.5, 1.0]),
}


def model_of(kind):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
               sliding_window=6, mini_batch_size=4, suffix_len=2, **MODES[kind])
    return PonderForCausalLM(PonderConfig(**cfg)).eval()


def one_forward_losses(model, stream):
    inputs, targets = stream[:, :-1], stream[:, 1:]
    with torch.no_grad():
        logits = model(inputs, targets=targets if model.config.is_ttt else None).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


@pytest.mark.parametrize("window", [8, 10])  # a multiple of the base chunk, and not
@pytest.mark.parametrize("kind", list(MODES))
def test_carried_state_equals_one_long_forward(kind, window):
    model = model_of(kind)
    stream = torch.randint(0, V, (2, 41))
    whole = one_forward_losses(model, stream)
    carried = stream_losses(model, stream, window, carry=True)
    torch.testing.assert_close(carried, whole, rtol=1e-5, atol=1e-5)
    fresh = stream_losses(model, stream, window, carry=False)
    for start in range(0, 40, window):  # not carried: each window on its own
        piece = one_forward_losses(model, stream[:, start : start + window + 1])
        torch.testing.assert_close(fresh[:, start : start + window], piece, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh[:, :window], carried[:, :window], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fresh[:, window:], carried[:, window:])  # the carried state is really used


@pytest.mark.parametrize("kind", ["swa", "cms"])
def test_heldout_bpb_carries_state_along_streams_of_windows(kind):
    model = model_of(kind)
    T, n = 8, 3
    stream = torch.randint(0, V, (1, 2 * n * T + 1))
    windows = stream[0].unfold(0, T + 1, T)  # consecutive windows sharing a boundary token
    ones = torch.ones(V, dtype=torch.long)
    carried = heldout_bpb(model, windows, ones, batch_size=2, carry_state=True)
    rows = torch.stack([stream[0, : n * T + 1], stream[0, n * T :]])  # the two streams of n windows
    torch.testing.assert_close(carried["eval/loss"], one_forward_losses(model, rows).mean().item(), rtol=1e-5, atol=0)
    fresh = heldout_bpb(model, windows, ones, batch_size=2)
    assert abs(fresh["eval/loss"] - carried["eval/loss"]) > 1e-5


def test_log_buckets_cover_every_position_once():
    spans = log_buckets(100, first=8)
    assert spans[0] == (0, 8) and spans[-1][1] == 100
    assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:]))
