"""The torch engine's one-token decode step replayed from CUDA graphs, one per batch-size bucket,
as vLLM does: a decode step of a small model is hundreds of kernels of a few microseconds each,
and launching them one by one leaves the GPU idle most of the time.

    decoder = GraphedDecoder(model)
    decoder.start(state, max_positions)     # a DecodeState after the prefill (and expand)
    logits = decoder.step(tokens)           # [rows] -> [rows, V]; repeat

Rows are padded up to the next bucket; a bucket's graph and its fixed buffers
(models/static_state.py) are made on first use and kept. TTT-E2E's inner update at a chunk's end
needs a gradient and runs eagerly, once per chunk. Without CUDA, or where capture fails, the
same fixed-buffer step runs eagerly (said once): the tokens are the same either way.
"""

from __future__ import annotations

import logging

import torch

from models.state import DecodeState
from models.static_state import StaticDecodeState

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket(rows: int) -> int:
    """The smallest bucket that holds `rows` (past the largest: the next multiple of it)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return -(-rows // BUCKETS[-1]) * BUCKETS[-1]


class GraphedDecoder:
    def __init__(self, model):
        self.model = model
        self.graphs: dict[tuple[int, int], tuple[StaticDecodeState, torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager_reason: str | None = None
        self.current = None
        self.rows = 0

    def start(self, state: DecodeState, max_positions: int) -> None:
        """Decode on from `state` (rows of a prefill, expanded), for at most `max_positions` positions in all."""
        self.rows = rows = next(kv[0].shape[0] for kv in state.kv if kv is not None)
        key = (bucket(rows), ring_positions(max_positions))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self.current = self.graphs[key]
        self.current[0].load(state)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        static, static_tokens, graph, static_logits = self.current
        static_tokens[: self.rows].copy_(tokens)
        if static.at_chunk_end():  # the inner update: eager, through the model's own forward
            state = static.to_state()
            with torch.no_grad():
                logits = self.model(static_tokens[:, None], state=state).logits[:, -1]
            static.load(state)
            return logits[: self.rows]
        if graph is None:  # the step the graph would replay, run eagerly
            static_logits = static.decode_step(static_tokens)
        else:
            graph.replay()
        static.advance_host()
        return static_logits[: self.rows]

    def _capture(self, rows: int, max_positions: int):
        device = next(self.model.parameters()).device
        dtype = self.model.embed.weight.dtype
        static = StaticDecodeState(self.model, rows, max_positions, dtype, device)
        tokens = torch.zeros(rows, dtype=torch.long, device=device)
        if device.type != "cuda":
            self._eager(f"CUDA graphs need a CUDA device, not {device.type}")
            return static, tokens, None, None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernels compile, workspaces are allocated
                    static.decode_step(tokens)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = static.decode_step(tokens)
            return static, tokens, graph, logits
        except RuntimeError as e:
            self._eager(f"capture failed ({str(e).splitlines()[0][:160]})")
            return static, tokens, None, None

    def _eager(self, reason: str) -> None:
        if self.eager_reason is None:
            log.warning("rollout.cuda_graphs: %s; decode steps run eagerly", reason)
        self.eager_reason = reason


def ring_positions(max_positions: int, step: int = 256) -> int:
    """Positions rounded up to a multiple of `step`, so calls of similar lengths share a graph."""
    return -(-max_positions // step) * step
