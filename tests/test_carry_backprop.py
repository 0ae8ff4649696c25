"""Training through the carried state (ttt.carry_backprop_windows): K windows read with the state
carried equal one forward over their K·T tokens, loss and gradient; the gradient of a later step
stops at the state carried into it; a resumed run equals an uninterrupted one."""

import dataclasses

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from training.carry import CarriedState
from training.config import ConfigError, LoopConfig, ModelConfig, OptimConfig, PretrainConfig, TTTConfig, check_config
from training.data import WindowLoader
from training.trainer import Trainer

V, T, BOUNDARY = 61, 8, 0
MODES = {
    "swa": dict(mode="swa"),
    "ttt_e2e": dict(mode="ttt_e2e"),
    "cms": dict(mode="ttt_e2e", cms_chunk_sizes=[4, 8, 16], cms_inner_lrs=[0.5, 0.5, 1.0]),
}


def model_of(kind, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               sliding_window=6, mini_batch_size=4, suffix_len=1, eos_token_id=BOUNDARY, **MODES[kind])
    return PonderForCausalLM(PonderConfig(**cfg)).to(dtype)


def stream_windows(n_windows, rows=2, seed=1):
    """[rows, n_windows, T+1] consecutive windows of random streams (sharing boundary tokens), with a
    few document boundaries in them."""
    stream = torch.randint(1, V, (rows, n_windows * T + 1), generator=torch.Generator().manual_seed(seed))
    stream[:, 5::11] = BOUNDARY
    return stream.unfold(1, T + 1, T)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", list(MODES))
def test_k_carried_windows_equal_one_forward_over_their_tokens(kind):
    model, K = model_of(kind), 3
    windows = stream_windows(K)
    loss, _, _ = CarriedState(model, BOUNDARY).loss(windows)
    loss.backward()
    carried = grads(model)

    model.zero_grad()
    stream = torch.cat([windows[:, 0], *(w[:, 1:] for w in windows[:, 1:].unbind(1))], 1)
    targets = stream[:, 1:].masked_fill(stream[:, :-1] == BOUNDARY, -100)
    whole = model(stream[:, :-1], targets=targets).loss
    whole.backward()
    torch.testing.assert_close(loss, whole, rtol=1e-10, atol=1e-12)
    assert carried.keys() == grads(model).keys()
    for name, g in grads(model).items():
        torch.testing.assert_close(carried[name], g, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["ttt_e2e", "cms"])
def test_a_steps_gradient_stops_at_the_state_carried_into_it(kind):
    """Step 2's gradient is the derivative of its loss with the state carried in held fixed (central
    differences in float64), not the full derivative through step 1's windows."""
    model, K = model_of(kind), 2
    windows = stream_windows(2 * K)
    carry = CarriedState(model, BOUNDARY)
    carry.loss(windows[:, :K])
    carry.truncate()
    carried_in = carry.state_dict()
    model.zero_grad()
    carry.loss(windows[:, K:])[0].backward()
    truncated = grads(model)

    model.zero_grad()
    full = CarriedState(model, BOUNDARY)
    full.loss(windows[:, :K])
    full.loss(windows[:, K:])[0].backward()  # no truncation: back through step 1's windows
    untruncated = grads(model)
    # W_0 starts the stream only: past step 1, nothing reaches it
    w0 = [n for n in untruncated if ("fast_mlp.f." in n or "memory_mlps" in n and ".f." in n)]
    assert w0 and not any(n in truncated for n in w0)

    def loss_from_carried_in():
        fixed = CarriedState(model, BOUNDARY)
        fixed.load_state_dict(carried_in)
        return fixed.loss(windows[:, K:])[0].item()

    params = dict(model.named_parameters())
    gen, eps = torch.Generator().manual_seed(3), 1e-6
    for name in ("embed.weight", "blocks.0.attn.f.wk.weight", "blocks.1.fast_mlp.f.w2.weight"):
        p = params[name]
        idx = tuple(torch.randint(0, n, (1,), generator=gen).item() for n in p.shape)
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + eps
            plus = loss_from_carried_in()
            p[idx] = orig - eps
            minus = loss_from_carried_in()
            p[idx] = orig
        got = truncated.get(name, torch.zeros_like(p))
        assert got[idx].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8), name
        # and the truncation is real: through step 1's windows the gradient differs
        assert (got - untruncated[name]).norm() > 1e-3 * untruncated[name].norm(), name


def test_stream_loader_serves_every_rows_stream_in_order_and_resumes():
    n, S, K, B = 24, 4, 2, 2
    windows = torch.arange(n)[:, None].repeat(1, T + 1)  # window i is all i
    loader = WindowLoader(windows, B, seed=0, stream_windows=S, windows_per_step=K)
    assert loader.batches_per_epoch == n // S // B * (S // K) and loader.tokens_per_batch == B * K * T
    served, starts = [], []
    for _ in range(loader.batches_per_epoch):
        served.append(loader.next_batch()[..., 0])
        starts.append(loader.starts_streams)
    assert starts == [True, False] * (loader.batches_per_epoch // 2)
    for first, second in zip(served[::2], served[1::2]):  # a row reads its stream on
        assert (first[:, 0] % S == 0).all() and torch.equal(torch.cat([first, second], 1), first[:, :1] + torch.arange(S))
    assert sorted(torch.cat(served).flatten().tolist()) == list(range(n))  # every window once per epoch
    resumed = WindowLoader(windows, B, seed=0, stream_windows=S, windows_per_step=K)
    resumed.load_state_dict({"epoch": 0, "cursor": 3})
    assert torch.equal(resumed.next_batch()[..., 0], served[3]) and not resumed.starts_streams


def trainer_of(tmp_path, windows, kind="cms"):
    cfg = PretrainConfig(
        model=ModelConfig(mode="ttt_e2e"), ttt=TTTConfig(carry_state=True, carry_backprop_windows=2, carry_stream_windows=4),
        optim=OptimConfig(lr=1e-2, warmup_steps=2), train=LoopConfig(steps=6, batch_size=2))
    check_config(cfg)
    model = model_of(kind, torch.float32)
    loader = WindowLoader(windows, 2, seed=0, stream_windows=4, windows_per_step=2)
    return Trainer(cfg, model, loader, windows[:2], torch.ones(V, dtype=torch.long), tmp_path, torch.device("cpu"))


def train(trainer, steps):
    return [trainer.train_step(trainer.loader.next_batch(), 0, trainer.loader.starts_streams)["train/loss"]
            for _ in range(steps)]


def test_a_resumed_run_carries_on_the_saved_state(tmp_path):
    windows = stream_windows(64, rows=1)[0]
    whole = trainer_of(tmp_path / "whole", windows)
    losses = train(whole, 6)

    killed = trainer_of(tmp_path / "killed", windows)
    assert train(killed, 3) == losses[:3]
    killed.save()  # step 3: mid-stream, the carried state in the checkpoint
    resumed = trainer_of(tmp_path / "killed", windows)
    assert resumed.maybe_resume() == 3 and resumed.carried.state is not None
    assert train(resumed, 3) == pytest.approx(losses[3:], rel=1e-6)
    for name, p in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], p, msg=name)

    forgetful = trainer_of(tmp_path / "killed", windows)  # the same resume without the carried state
    forgetful.maybe_resume()
    forgetful.carried.reset()
    assert abs(train(forgetful, 1)[0] - losses[3]) > 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(ttt=TTTConfig(carry_backprop_windows=2)), "ttt.carry_backprop_windows=2 needs ttt.carry_state=true"),
    (dict(ttt=TTTConfig(carry_state=True, carry_backprop_windows=2), model=ModelConfig(mode="full")),
     "ttt.carry_backprop_windows=2 needs model.mode=ttt_e2e or swa"),
    (dict(ttt=TTTConfig(carry_state=True, carry_backprop_windows=3, carry_stream_windows=8)),
     "ttt.carry_stream_windows=8 must be a multiple of ttt.carry_backprop_windows=3"),
])
def test_misconfigured_carry_backprop_fails_naming_the_keys(change, message):
    cfg = dataclasses.replace(PretrainConfig(model=ModelConfig(mode="ttt_e2e")), **change)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_config(cfg)
