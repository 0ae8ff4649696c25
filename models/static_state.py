"""Decoding state in fixed buffers, so that a one-token decode step can be captured in a CUDA
graph and replayed (rollout/graphed_decode.py).

A DecodeState (models/state.py) grows and trims its caches by concatenation: every step has new
shapes. A StaticDecodeState holds the same information in buffers of fixed shape:

- every layer's keys and values in a ring [B, Hkv, S, D] (`RingKV`): position p lives in slot
  p % S, and a per-slot position tells attention which slots are in its window. S is the window
  (the context for full attention), plus one chunk for TTT-E2E's suffix layers, which keep the
  keys of the chunk being read so the inner update can recompute it;
- the position as a device tensor, which the step advances itself;
- TTT-E2E's fast weights and the pending chunk's suffix inputs and targets, at index p % b.

`decode_step` reads one token per row and advances the state in place with no host
synchronisation and no allocation that depends on the position. The inner update at a chunk's
end needs the chunk's gradient and runs eagerly: `to_state` gives the equivalent DecodeState,
the model's own forward reads the token (learning from the completed chunk), and `load` writes
the result back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.state import UNKNOWN, DecodeState


@dataclass
class RingKV:
    """One layer's rotated keys and values in a ring of S slots."""

    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor
    slot_pos: torch.Tensor  # [S] long: the position each slot holds, -1 while empty
    pos: torch.Tensor  # 0-dim long, shared by every layer: the position being read
    window: int | None

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write one position's keys and values [B, Hkv, 1, D] at its slot; returns every slot's
        keys and values and the mask [1, 1, 1, S] of those the query at `pos` sees."""
        slot = (self.pos % self.k.shape[2]).view(1)
        self.k.index_copy_(2, slot, k_new.to(self.k.dtype))
        self.v.index_copy_(2, slot, v_new.to(self.v.dtype))
        self.slot_pos.index_copy_(0, slot, self.pos.view(1))
        visible = (self.slot_pos >= 0) & (self.slot_pos <= self.pos)
        if self.window is not None:
            visible &= self.slot_pos > self.pos - self.window
        return self.k, self.v, visible.view(1, 1, 1, -1)

    def ordered(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of positions lo .. hi-1, in order."""
        slots = torch.arange(lo, hi, device=self.k.device) % self.k.shape[2]
        return self.k.index_select(2, slots), self.v.index_select(2, slots)

    def load(self, k: torch.Tensor, v: torch.Tensor, end: int) -> None:
        """Hold exactly the positions end - n .. end - 1 of k, v [B, Hkv, n, D]."""
        n = k.shape[2]
        positions = torch.arange(end - n, end, device=self.k.device)
        self.slot_pos.fill_(-1)
        self.slot_pos.index_copy_(0, positions % self.k.shape[2], positions)
        self.k.index_copy_(2, positions % self.k.shape[2], k.to(self.k.dtype))
        self.v.index_copy_(2, positions % self.k.shape[2], v.to(self.v.dtype))


class StaticDecodeState:
    """A DecodeState's content in fixed buffers for `rows` sequences of a Ponder model."""

    def __init__(self, model, rows: int, max_positions: int, dtype: torch.dtype, device: torch.device):
        cfg = model.config
        self.model, self.rows = model, rows
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.host_pos = 0  # the same position, known to the host without a sync
        self.chunk = cfg.mini_batch_size if cfg.is_ttt else None
        self.n_prefix = model.n_prefix
        window = cfg.sliding_window if cfg.mode != "full" else None
        self.window = window
        self.kv = []
        for layer in range(cfg.num_hidden_layers):
            slots = max_positions if window is None else window
            if cfg.is_ttt and layer >= model.n_prefix:
                slots = min(slots + self.chunk, max_positions) if window is not None else slots
            shape = (rows, cfg.num_key_value_heads, slots, cfg.head_dim)
            self.kv.append(RingKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                                  torch.full((slots,), -1, dtype=torch.long, device=device), self.pos, window))
        self.fast = None
        if cfg.is_ttt:
            self.fast = [[torch.zeros(rows, *w.shape, dtype=w.dtype, device=device) for w in block.fast_weights()]
                         for block in model.blocks[model.n_prefix:]]
            self.pending_h = torch.zeros(rows, self.chunk, cfg.hidden_size, dtype=dtype, device=device)
            self.pending_targets = torch.full((rows, self.chunk), UNKNOWN, dtype=torch.long, device=device)
        self.memory, self.learn, self.chunk_start = None, True, 0

    # ------------------------------------------------------------------ to and from a DecodeState
    def load(self, state: DecodeState) -> None:
        """Take over `state` (same number of rows; `rows` of this state may be more: the rest are padding)."""
        n = next(kv[0].shape[0] for kv in state.kv if kv is not None)
        self.host_pos = state.pos
        self.pos.fill_(state.pos)
        for ring, kv in zip(self.kv, state.kv):
            ring.load(*(pad_rows(t, self.rows) for t in kv), state.pos)
        if self.fast is not None:
            for static, layer in zip(self.fast, state.fast):
                for buf, w in zip(static, layer):
                    buf.copy_(pad_rows(w.detach().expand(n, *w.shape[1:]), self.rows))
            self.pending_targets.fill_(UNKNOWN)
            if state.pending_len:
                k = state.pending_len
                self.pending_h[:, :k].copy_(pad_rows(state.pending_h, self.rows))
                self.pending_targets[:, :k].copy_(pad_rows(state.pending_targets, self.rows))
            self.memory, self.learn, self.chunk_start = state.memory, state.learn, state.chunk_start

    def to_state(self) -> DecodeState:
        """The equivalent DecodeState (every row, padding included), sharing no storage with this one."""
        p = self.host_pos
        kv = []
        for layer, ring in enumerate(self.kv):
            if self.fast is not None and layer >= self.n_prefix:
                lo = 0 if self.window is None else max(0, self.chunk_start - self.window)  # trimmed at chunk ends
            else:
                lo = 0 if self.window is None else max(0, p - self.window)
            kv.append(ring.ordered(lo, p) if p > lo else None)
        state = DecodeState(kv=kv, pos=p)
        if self.fast is not None:
            state.fast = [[w.clone() for w in layer] for layer in self.fast]
            state.memory, state.learn, state.chunk_start = self.memory, self.learn, self.chunk_start
            k = p - self.chunk_start
            if k:
                state.pending_h = self.pending_h[:, :k].clone()
                state.pending_targets = self.pending_targets[:, :k].clone()
        return state

    def at_chunk_end(self) -> bool:
        """Would the next token complete the pending chunk's targets (an inner update, or the
        chunk's end without one)? Then the step runs eagerly through to_state / load."""
        return self.fast is not None and self.host_pos - self.chunk_start == self.chunk

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Read one token per row [rows]; the next logits [rows, V]. Only for positions inside a
        chunk (not at_chunk_end): capturable in a CUDA graph."""
        model = self.model
        P = self.n_prefix
        h = model.embed(tokens[:, None])
        if self.fast is None:
            h = model.run_blocks(model.blocks, h, self.pos, self)
        else:
            # the token is the previous position's inner target, unless it opens a chunk
            prev = ((self.pos - 1) % self.chunk).view(1)
            keep = self.pending_targets.index_select(1, prev)
            opens = (self.pos % self.chunk) == 0
            self.pending_targets.index_copy_(1, prev, torch.where(opens, keep, tokens[:, None]))
            h = model.run_blocks(model.blocks[:P], h, self.pos, self)
            self.pending_h.index_copy_(1, (self.pos % self.chunk).view(1), h)
            self.pending_targets.index_fill_(1, (self.pos % self.chunk).view(1), UNKNOWN)
            h = model.run_blocks(model.blocks[P:], h, self.pos, self, P, self.fast)
        logits = model.lm_head(h)[:, 0]
        self.pos += 1
        return logits

    def advance_host(self) -> None:
        """The host's copy of the position, after a decode_step (or its replay)."""
        self.host_pos += 1


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, ...] with rows - n rows of zeros appended."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
