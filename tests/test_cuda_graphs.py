"""CUDA graphs give what eager execution gives: the training step's loss and gradients
(training/cuda_graph.py) and the torch engine's decoded tokens (rollout/graphed_decode.py).
The graph tests need a GPU and skip without one; the fallbacks are checked everywhere."""

import logging

import pytest
import torch

from tests.kernel_checks import DEVICE, assert_close  # noqa: I001  (first: picks the interpreter)

from models import PonderConfig, PonderForCausalLM  # noqa: E402
from training.cuda_graph import GraphedStep  # noqa: E402

needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU")


def tiny_ttt(device, kernels="auto"):
    torch.manual_seed(0)
    cfg = PonderConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                       mode="ttt_e2e", sliding_window=16, mini_batch_size=8, kernels=kernels)
    model = PonderForCausalLM(cfg).to(device)
    model.inner_lr = torch.tensor(0.5, device=device)
    return model


def loss_fn(model):
    def run(batch):
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=batch.device.type == "cuda",
                            cache_enabled=False):
            out = model(batch[:, :-1], targets=batch[:, 1:])
        return out.loss, out.logits
    return run


def eager_grads(model, batch):
    for p in model.parameters():
        p.grad = None
    loss, logits = loss_fn(model)(batch)
    loss.backward()
    return loss.detach(), logits.detach(), [p.grad.clone() for p in model.parameters()]


@needs_gpu
def test_graphed_training_step_matches_eager():
    """Replays on new batches and a changed inner learning rate give eager's loss, logits and
    second-order meta-gradient."""
    model = tiny_ttt("cuda")
    step = GraphedStep(loss_fn(model), list(model.parameters()))
    for i, lr in enumerate((0.5, 0.9)):
        batch = torch.randint(0, 97, (2, 33), device="cuda")
        model.inner_lr.fill_(lr)
        loss, logits = step(batch)
        assert step.graph is not None, step.eager_reason
        grads = [p.grad.clone() for p in model.parameters()]
        ref_loss, ref_logits, ref_grads = eager_grads(model, batch)
        assert_close(f"graphed loss, batch {i}", loss, ref_loss, 1e-6)
        assert_close(f"graphed logits, batch {i}", logits, ref_logits, 1e-5)
        assert_close(f"graphed meta-gradient, batch {i}", torch.cat([g.flatten() for g in grads]),
                     torch.cat([g.flatten() for g in ref_grads]), 1e-5)


def test_graphed_step_runs_eagerly_where_it_cannot_capture(caplog):
    """Without CUDA (or on a shape change) the step runs eagerly, gives eager's gradients, and says
    why in one line."""
    model = tiny_ttt("cpu", kernels="torch")
    batch = torch.randint(0, 97, (2, 17))
    with caplog.at_level(logging.WARNING, logger="training.cuda_graph"):
        step = GraphedStep(loss_fn(model), list(model.parameters()))
        loss, _ = step(batch)
        step(batch)
    assert step.graph is None and "CUDA device" in step.eager_reason
    assert len(caplog.records) == 1 and "run eagerly" in caplog.records[0].getMessage()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    ref_loss, _, ref_grads = eager_grads(model, batch)
    assert_close("eager fallback loss", loss, ref_loss, 1e-7)
    # the second call's gradient, not the sum of both: a replay overwrites them too
    assert_close("eager fallback gradient", torch.cat([g.flatten() for g in grads]),
                 torch.cat([g.flatten() for g in ref_grads]), 1e-6)


DECODE_CASES = {
    "ttt_e2e, learning while decoding": dict(mode="ttt_e2e", ttt_update_during_decode=True),
    "ttt_e2e, context only": dict(mode="ttt_e2e", ttt_update_during_decode=False),
    "sliding window": dict(mode="swa"),
    "full attention": dict(mode="full"),
}


def tiny_decoder_model(**mode):
    torch.manual_seed(0)
    cfg = PonderConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, sliding_window=8, mini_batch_size=4, **mode)
    return PonderForCausalLM(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_fixed_buffer_decode_matches_the_model(case):
    """Three rows (padded to a bucket of four) decode 20 tokens after an 11-token prefill, crossing
    five chunk ends and the window, through the fixed-buffer step (graphed on a GPU) and through
    the model's own forward: the same logits."""
    from rollout.graphed_decode import GraphedDecoder

    model = tiny_decoder_model(**DECODE_CASES[case])
    state = model.new_state(3)
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 11)), state=state)
    if model.config.is_ttt:
        state.learn = model.config.ttt_update_during_decode
    decoder = GraphedDecoder(model)
    decoder.start(state.expand(1), max_positions=31)
    tokens = torch.randint(0, 97, (20, 3))
    for t in range(20):
        with torch.no_grad():
            ref = model(tokens[t][:, None], state=state).logits[:, -1]
        assert_close(f"{case}: logits at step {t}", decoder.step(tokens[t]), ref, 1e-5)
    assert (decoder.current[2] is not None) == (DEVICE == "cuda"), decoder.eager_reason


def test_engine_thinks_the_same_through_fixed_buffers():
    """TorchEngine.think with the fixed-buffer decoder samples the same thoughts and scores as without."""
    from rollout.torch_engine import TorchEngine

    model = tiny_decoder_model(mode="ttt_e2e")
    contexts, next_tokens = torch.randint(0, 95, (3, 9)).tolist(), [1, 2, 3]
    groups = {}
    for graphs in (False, True):
        engine = TorchEngine(model, DEVICE, seed=3, cuda_graphs=graphs)
        groups[graphs] = engine.think(contexts, next_tokens, n=2, max_new_tokens=10, temperature=1.0, top_p=1.0,
                                      think_open=95, think_close=96)
    for a, b in zip(groups[False], groups[True]):
        assert a.thoughts == b.thoughts
        assert b.logp_next_with_thought == pytest.approx(a.logp_next_with_thought, rel=1e-4, abs=1e-5)
        for x, y in zip(a.thought_logprobs, b.thought_logprobs):
            assert y == pytest.approx(x, rel=1e-4, abs=1e-5)
