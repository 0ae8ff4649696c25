"""A training step's forward and backward captured once as a CUDA graph and replayed
(`train.cuda_graphs=true`).

At batch 1 a TTT-E2E meta-learning step issues tens of thousands of small kernels (every chunk runs
the suffix forward, its backward with create_graph, and the outer backward through both): the host
cannot launch them as fast as the GPU runs them. A graph replays the whole recorded launch
sequence in one call. It needs fixed shapes and no host synchronisation inside the step; the
optimiser step stays outside, so a non-finite loss still skips it.

    step = GraphedStep(loss_fn, params)          # loss_fn(batch) -> (loss, logits)
    loss, logits = step(batch)                   # p.grad of every parameter: this batch's gradient

Where capture is impossible (no CUDA device, a shape change, an op that synchronises) the step
runs eagerly from then on, and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager runs on a side stream before capture: kernels compile, allocators settle


class GraphedStep:
    def __init__(self, loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 params: Sequence[torch.nn.Parameter], unsupported: str | None = None):
        """unsupported: why this run cannot be captured (it then runs eagerly, said once)."""
        self.loss_fn, self.params = loss_fn, list(params)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grads: list[torch.Tensor | None] = []
        self.eager_reason: str | None = None
        if unsupported:
            self._fall_back(unsupported)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eager_reason is None and self.graph is None:
            self._capture(batch)
        if self.graph is not None and batch.shape == self.static_batch.shape and batch.dtype == self.static_batch.dtype:
            self.static_batch.copy_(batch, non_blocking=True)
            self.graph.replay()
            for p, g in zip(self.params, self.grads):
                p.grad = g  # the graph writes these tensors; the caller may have dropped its references
            return self.outputs
        if self.graph is not None:
            self._fall_back(f"the batch shape changed from {tuple(self.static_batch.shape)} to {tuple(batch.shape)}")
        return self._eager(batch)

    def _eager(self, batch):
        self._zero_grads()  # as a replay does: the gradients are this batch's alone
        loss, logits = self.loss_fn(batch)
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach(), logits.detach()

    def _capture(self, batch: torch.Tensor) -> None:
        if batch.device.type != "cuda":
            self._fall_back(f"CUDA graphs need a CUDA device, not {batch.device.type}")
            return
        try:
            self.static_batch = batch.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._zero_grads()
                    loss, _ = self.loss_fn(self.static_batch)
                    loss.backward()
            torch.cuda.current_stream().wait_stream(side)
            self._zero_grads()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss, logits = self.loss_fn(self.static_batch)
                loss.backward()
            self.graph, self.outputs = graph, (loss.detach(), logits.detach())
            self.grads = [p.grad for p in self.params]
        except RuntimeError as e:  # capture refused: an op synchronised with the host, or is not capturable
            self.graph = None
            self._zero_grads()
            self._fall_back(f"capture failed ({str(e).splitlines()[0][:160]})")

    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _fall_back(self, reason: str) -> None:
        self.graph, self.eager_reason = None, reason
        log.warning("train.cuda_graphs: %s; training steps run eagerly", reason)
