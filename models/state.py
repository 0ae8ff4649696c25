"""Per-sequence decoding state: what a Ponder model keeps between calls.

kv[layer] holds the rotated keys and values a later token may attend to (the last `window` of
them with sliding-window attention, so a decode step costs O(window) whatever the context).
With TTT-E2E, `fast` holds every sequence's own fast weights (per suffix layer: w1, w2, w3 with
a leading batch dimension) and `pending_*` the chunk read since the last inner update: its suffix
inputs and the inner targets of its positions (-100: masked; UNKNOWN: the token after the last
one read, filled in when it arrives). The suffix layers keep their keys for that chunk beyond the window, so the
update can recompute the chunk exactly as it was first computed. With continuum memory, `fast` holds
every level's weights (per suffix layer: w1, w2, w3 of the fastest level, then of the next, ...)
and `memory` what the slower levels gathered towards their next update (models/memory.py).

A `differentiable` state (training through the carried state, training/carry.py) keeps the graph
that made it: a loss computed after it differentiates back through every window it carried, until
`detached()` cuts it there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

UNKNOWN = -1  # an inner target not read yet


@dataclass
class DecodeState:
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    fast: list[list[torch.Tensor]] | None = None
    memory: list | None = None  # nested lists of [B, ...] tensors (or None), kept between inner updates
    pos: int = 0  # tokens read so far
    learn: bool = True  # False: fast weights stay as they are (a full pending chunk is dropped)
    chunk_start: int = 0  # position of the pending chunk's first token
    pending_h: torch.Tensor | None = None  # [B, n, d]
    pending_targets: torch.Tensor | None = None  # [B, n]
    differentiable: bool = False  # True: the outer gradient flows through the state (training)

    @property
    def pending_len(self) -> int:
        return 0 if self.pending_targets is None else self.pending_targets.shape[1]

    def resolve_pending_target(self, next_ids: torch.Tensor) -> None:
        """The pending chunk's last target, if still unknown, is the first token of the next read."""
        if self.pending_targets is not None:
            last = self.pending_targets[:, -1:]
            self.pending_targets = torch.cat([self.pending_targets[:, :-1], torch.where(last == UNKNOWN, next_ids, last)], 1)

    def trim(self, layers, keep: int | None) -> None:
        """Keep the last `keep` keys/values of `layers` (None: keep all)."""
        if keep is None:
            return
        for layer in layers:
            if self.kv[layer] is not None:
                k, v = self.kv[layer]
                self.kv[layer] = (k[:, :, -keep:], v[:, :, -keep:])

    def advance(self, input_ids: torch.Tensor, window: int | None) -> None:
        self.pos += input_ids.shape[1]
        self.trim(range(len(self.kv)), window)

    def expand(self, n: int) -> DecodeState:
        """A state for n copies of every sequence (sequence b -> rows b*n .. b*n+n-1), e.g. G
        thoughts sampled from one context read once."""

        def rep(t):
            return None if t is None else t.repeat_interleave(n, dim=0)

        return DecodeState(
            kv=[None if kv is None else (rep(kv[0]), rep(kv[1])) for kv in self.kv],
            fast=None if self.fast is None else [[rep(w) for w in layer] for layer in self.fast],
            memory=map_tensors(rep, self.memory),
            pos=self.pos, learn=self.learn, chunk_start=self.chunk_start,
            pending_h=rep(self.pending_h), pending_targets=rep(self.pending_targets),
        )

    def detached(self) -> DecodeState:
        """The same state cut from the graph that made it: what is computed from it later reaches the
        parameters only through its own graph (truncated backprop). A differentiable state's fast
        weights become leaves that track gradients, since the inner loop differentiates by them."""
        cut = torch.Tensor.detach
        return DecodeState(
            kv=[None if kv is None else (cut(kv[0]), cut(kv[1])) for kv in self.kv],
            fast=map_tensors(lambda w: w.detach().requires_grad_(self.differentiable), self.fast),
            memory=map_tensors(cut, self.memory), pos=self.pos, learn=self.learn, chunk_start=self.chunk_start,
            pending_h=map_tensors(cut, self.pending_h), pending_targets=self.pending_targets,
            differentiable=self.differentiable,
        )

    def to_dict(self) -> dict:
        """Plain lists, numbers and detached tensors, for a checkpoint; from_dict reverses it."""
        return dataclasses.asdict(self.detached())

    @classmethod
    def from_dict(cls, d: dict) -> DecodeState:
        return cls(**{**d, "kv": [None if kv is None else tuple(kv) for kv in d["kv"]]}).detached()


def map_tensors(fn, x):
    """fn applied to every tensor in nested lists, tuples and dicts; anything else (None, numbers) kept."""
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(fn, v) for v in x)
    return fn(x) if isinstance(x, torch.Tensor) else x
