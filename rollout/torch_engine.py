"""The built-in rollout engine: plain torch over a Ponder model, any mode (full attention, sliding
window, TTT-E2E with its per-sequence fast weights), or over a Hugging Face causal LM (its KV cache).

Every context is read ONCE: its prefill builds a DecodeState (caches, and with TTT-E2E the fast
weights adapted to the context), which is then copied to the n rows that sample continuations.
`think` reads contexts of one length together (one prefill, one decode batch of B·n rows); the
RLP worker draws one set of positions per batch of windows so that they share a length.
For RLP (`think`) the same prefill also gives the no-thought score of the next token, so
neither the context nor its inner-loop updates are ever recomputed per thought.

    engine = TorchEngine(model, device="cuda", seed=0)
    groups = engine.think(contexts, next_tokens, n=16, max_new_tokens=256, temperature=0.7,
                          top_p=1.0, think_open=tok.think_open, think_close=tok.think_close)

Sampled tokens carry their log-prob under softmax(logits / temperature) before top-p truncation
(see rollout/engine.py); scores of true next tokens are at temperature 1.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from models.hf import is_ponder, is_ttt
from rollout.engine import Generation, ThoughtGroup
from rollout.graphed_decode import GraphedDecoder

if TYPE_CHECKING:
    from models import PonderForCausalLM
    from models.state import DecodeState

# Fed to rows that have finished while others in their batch still decode; their outputs are
# never read, any valid id will do.
FILLER = 0


def sampling_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the sampling distribution, softmax(logits / temperature), in at least float32.
    Temperature 0 (greedy) has no such distribution: the model's own (temperature 1) is used."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V]: greedy at temperature 0, otherwise from the
    temperature-scaled distribution cut to its top-p nucleus. Returns (token [B] long, logprob [B]),
    logprob under the sampling distribution before the top-p cut (what the learner recomputes)."""
    logprobs = sampling_logprobs(logits, temperature)
    if temperature <= 0:
        token = logprobs.argmax(-1)
    else:
        probs = logprobs.exp()
        if top_p < 1.0:
            # The nucleus: the most likely tokens until their mass reaches top_p. A token stays
            # if the mass before it is still short of top_p; the most likely one always stays.
            sorted_probs, order = probs.sort(-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
            drop[:, 0] = False
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def indices_by_length(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """The indices of `sequences`, grouped by sequence length (each group in order): what one
    batched prefill can read together."""
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(i)
    return list(groups.values())


class CacheState:
    """A Hugging Face causal LM's decoding state (its KV cache), shaped like Ponder's DecodeState
    where the engine touches it: `expand` copies every sequence to n rows."""

    def __init__(self, cache):
        self.cache = cache

    def expand(self, n: int) -> "CacheState":
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n)
        return CacheState(cache)


class TorchEngine:
    """The Engine for every Ponder model and any Hugging Face causal LM, run in-process with torch
    (CPU or one GPU)."""

    def __init__(self, model: PonderForCausalLM, device: str | torch.device = "cpu", seed: int = 0,
                 cuda_graphs: bool | None = None):
        """cuda_graphs: decode a Ponder model through fixed buffers replayed from CUDA graphs
        (rollout/graphed_decode.py); None: where the device is a GPU. On CPU the same step runs eagerly."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # Its own generator: results depend on the seed only, not on whatever else draws numbers.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.version = 0
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.decoder = GraphedDecoder(self.model) if graphs and is_ponder(self.model) else None
        self.decoding: GraphedDecoder | None = None  # the decoder while it holds the state being decoded

    def _ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _read(self, contexts: list[list[int]]) -> tuple[DecodeState, torch.Tensor]:
        """Prefill contexts of one length in one batch. Returns their state and the logits after
        their last tokens [B, V]. What comes next is decoding: TTT-E2E's fast weights keep
        learning from it only if the config says so."""
        if not contexts[0]:
            raise ValueError("a prompt or context needs at least one token")
        if is_ponder(self.model):
            state = self.model.new_state(len(contexts))
        else:
            from transformers import DynamicCache

            state = CacheState(DynamicCache(config=self.model.config))
        logits = self._forward(self._ids(contexts), state)[:, -1]
        if is_ttt(self.model):
            state.learn = self.model.config.ttt_update_during_decode
        return state, logits

    def _forward(self, ids: torch.Tensor, state) -> torch.Tensor:
        """Read ids [B, L] on from `state` (moved on in place); the logits [B, L, V]."""
        if isinstance(state, CacheState):
            return self.model(input_ids=ids, past_key_values=state.cache, use_cache=True).logits
        return self.model(ids, state=state).logits

    def _decode_from(self, state, max_positions: int) -> None:
        """Decoding steps from here on read on from `state` (at most max_positions positions in all)."""
        self.decoding = self.decoder if self.decoder is not None and not isinstance(state, CacheState) else None
        if self.decoding is not None:
            self.decoding.start(state, max_positions)

    def _step(self, tokens: torch.Tensor, active: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one token per row (FILLER where the row is no longer active); the next logits [B, V]."""
        tokens = torch.where(active, tokens, FILLER)
        if self.decoding is not None:
            return self.decoding.step(tokens)
        return self._forward(tokens[:, None], state)[:, -1]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop: Sequence[int] = ()) -> list[list[Generation]]:
        """n samples per prompt, until a stop token (kept) or max_new_tokens. Prompts of one length
        go through together: one prefill of B prompts, one decode batch of B·n rows."""
        results: list[list[Generation] | None] = [None] * len(prompts)
        for rows in indices_by_length(prompts):
            for i, generations in zip(rows, self._generate_batch([prompts[i] for i in rows], n, max_new_tokens,
                                                                 temperature, top_p, stop)):
                results[i] = generations
        return results

    def _generate_batch(self, prompts, n, max_new_tokens, temperature, top_p, stop) -> list[list[Generation]]:
        """generate() for prompts of one length; row b*n + i is prompt b's sample i."""
        stop_ids = torch.tensor(list(stop), dtype=torch.long, device=self.device)
        state, logits = self._read(prompts)
        state, logits = state.expand(n), logits.repeat_interleave(n, 0)
        self._decode_from(state, len(prompts[0]) + max_new_tokens)
        rows = len(prompts) * n
        tokens, logprobs = [], []
        running = torch.ones(rows, dtype=torch.bool, device=self.device)
        length = torch.full((rows,), max_new_tokens, device=self.device)
        for step in range(max_new_tokens):
            token, logprob = sample_next(logits, temperature, top_p, self.generator)
            tokens.append(token)
            logprobs.append(logprob)
            stopped = running & torch.isin(token, stop_ids)
            length[stopped] = step + 1
            running &= ~stopped
            if step == max_new_tokens - 1 or not running.any():
                break
            logits = self._step(token, running, state)
        ids = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(rows)]
        lps = torch.stack(logprobs, 1).tolist() if tokens else [[] for _ in range(rows)]
        out = [Generation(ids=ids[r][:k], logprobs=lps[r][:k], finish_reason="length" if still else "stop")
               for r, (k, still) in enumerate(zip(length.tolist(), running.tolist()))]
        return [out[b * n : b * n + n] for b in range(len(prompts))]

    @torch.no_grad()
    def think(self, contexts: list[list[int]], next_tokens: list[int], n: int, max_new_tokens: int,
              temperature: float, top_p: float, think_open: int, think_close: int) -> list[ThoughtGroup]:
        """Per context: prefill it, score next_token without a thought, feed <think>, copy the
        state to n rows and sample until each row has fed its </think> (forced at the limit);
        the logits after a row's </think> score next_token with that thought. Contexts of one
        length go through together: one prefill of B contexts, one decode batch of B·n rows
        (each row its own state, TTT-E2E's fast weights included). Groups in the order given."""
        if len(next_tokens) != len(contexts):
            raise ValueError(f"{len(contexts)} contexts but {len(next_tokens)} next tokens")
        groups: list[ThoughtGroup | None] = [None] * len(contexts)
        for rows in indices_by_length(contexts):
            batch = self._think_batch([contexts[i] for i in rows], [next_tokens[i] for i in rows], n, max_new_tokens,
                                      temperature, top_p, think_open, think_close)
            for i, group in zip(rows, batch):
                groups[i] = group
        return groups

    def _think_batch(self, contexts, next_tokens, n, max_new_tokens, temperature, top_p, think_open, think_close):
        """think() for contexts of one length."""
        B = len(contexts)
        # One prefill serves the no-thought scores and, copied n times, every thought.
        state, logits = self._read(contexts)
        targets = self._ids(next_tokens)
        no_thought = sampling_logprobs(logits, 1.0).gather(-1, targets[:, None])[:, 0].tolist()
        logits = self._forward(self._ids([[think_open]] * B), state)[:, -1]
        state, logits = state.expand(n), logits.repeat_interleave(n, 0)
        self._decode_from(state, len(contexts[0]) + max_new_tokens + 2)  # <think>, thought, </think>
        targets = targets.repeat_interleave(n)  # row b*n + i: context b, thought i

        tokens, logprobs = [], []
        thinking = torch.ones(B * n, dtype=torch.bool, device=self.device)
        length = torch.full((B * n,), max_new_tokens + 1, device=self.device)
        with_thought = torch.zeros(B * n, device=self.device)
        for step in range(max_new_tokens + 1):
            if step < max_new_tokens:
                token, logprob = sample_next(logits, temperature, top_p, self.generator)
            else:  # at the limit every open thought is closed, scored as if sampled
                token = torch.full((B * n,), think_close, device=self.device)
                logprob = sampling_logprobs(logits, temperature)[:, think_close]
            tokens.append(token)
            logprobs.append(logprob)
            closing = thinking & (token == think_close)
            # </think> is fed too: the logits after it predict x_t given the thought.
            logits = self._step(token, thinking, state)
            next_logprob = sampling_logprobs(logits, 1.0).gather(-1, targets[:, None])[:, 0]
            with_thought = torch.where(closing, next_logprob, with_thought)
            length[closing] = step + 1
            thinking &= ~closing
            if not thinking.any():
                break

        ids, lps = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        lengths, scores = length.tolist(), with_thought.tolist()
        return [ThoughtGroup(
            thoughts=[ids[r][: lengths[r]] for r in range(b * n, b * n + n)],
            thought_logprobs=[lps[r][: lengths[r]] for r in range(b * n, b * n + n)],
            logp_next_with_thought=scores[b * n : b * n + n],
            logp_next_no_thought=no_thought[b],
            truncated=[lengths[r] > max_new_tokens for r in range(b * n, b * n + n)],
        ) for b in range(B)]

    @torch.no_grad()
    def score(self, sequences: list[list[int]], targets: list[int]) -> torch.Tensor:
        """Teacher-forced log p(targets[i] | sequences[i]), one forward over a right-padded batch:
        causality keeps padding out of every real position (TTT-E2E's fast weights are per
        sequence and learn only from earlier chunks). A tensor [N] (at least float32) on the CPU."""
        if len(sequences) != len(targets):
            raise ValueError(f"{len(sequences)} sequences but {len(targets)} targets")
        if any(not s for s in sequences):
            raise ValueError("every sequence needs at least one token")
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        batch = self._ids([s + [FILLER] * (int(lengths.max()) - len(s)) for s in sequences])
        logits = self.model(batch).logits
        last = logits[torch.arange(len(sequences), device=self.device), lengths - 1]
        return sampling_logprobs(last, 1.0).gather(-1, self._ids(targets)[:, None]).squeeze(-1).cpu()

    @torch.no_grad()
    def next_token_entropy(self, windows: torch.Tensor) -> torch.Tensor:
        """Entropy (nats) of the model's next-token distribution after every token of [N, T]
        windows (TTT-E2E's inner loop running, as when it reads a context): [N, T] on the CPU."""
        logp = sampling_logprobs(self.model(windows.to(self.device)).logits, 1.0)
        return -(logp.exp() * logp).sum(-1).cpu()

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state, strict=True)
        self.version = version
