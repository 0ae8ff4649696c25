"""Training through the carried state (ttt.carry_backprop_windows = K): truncated backprop through time
across windows.

Every batch row reads one stream of consecutive windows of the corpus (WindowLoader with
stream_windows), K windows per optimiser step. The row's DecodeState (the attention cache, every
level's fast weights and gradient sums) is carried from window to window and from step to step,
as evaluation with ttt.carry_state carries it. A step's loss is the training loss of its K windows
taken together, and its gradient flows through those K windows and the chain of states between
them; the state carried into the step counts as a constant (cut after every step), so no gradient
reaches back more than K windows. At the start of each stream the state starts afresh (W_0, an
empty cache), so W_0 keeps learning.

With K windows of T tokens, T a multiple of the inner chunk and the sliding window at most T, a
step from a fresh state computes exactly the loss and gradient of one forward over K·T tokens.
"""

from __future__ import annotations

import torch

from models.hf import is_ttt
from models.state import DecodeState, map_tensors
from training.data import split_window


class CarriedState:
    """The state every batch row carries between training steps."""

    def __init__(self, model, boundary_id: int | None = None):
        self.model, self.boundary_id = model, boundary_id
        self.state: DecodeState | None = None  # None: every row starts afresh at its next window

    def loss(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training loss of [B, K, T+1] windows read in turn, each row continuing its state; also
        their logits [B, K·T, V] and targets [B, K·T]. The graph reaches back to the state carried in."""
        if self.state is None:
            self.state = self.model.new_state(windows.shape[0], differentiable=True)
        start = self.state.pos
        logits, targets = [], []
        for k in range(windows.shape[1]):
            inputs, window_targets = split_window(windows[:, k], self.boundary_id)
            # A TTT-E2E model's inner loop learns from the targets (boundaries masked); the loss is taken below.
            inner_targets = window_targets if is_ttt(self.model) else None
            logits.append(self.model(inputs, targets=inner_targets, state=self.state).logits)
            targets.append(window_targets)
        logits, targets = torch.cat(logits, 1), torch.cat(targets, 1)
        return self.model.outer_loss(logits, targets, start), logits, targets

    def truncate(self) -> None:
        """Cut the graph behind the state: later steps' gradients stop here."""
        if self.state is not None:
            self.state = self.state.detached()

    def reset(self) -> None:
        self.state = None

    def state_dict(self) -> dict | None:
        return None if self.state is None else self.state.to_dict()

    def load_state_dict(self, state: dict | None, device: torch.device | str = "cpu") -> None:
        if state is None:
            self.state = None
            return
        self.state = DecodeState.from_dict(map_tensors(lambda t: t.to(device), state))
