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
