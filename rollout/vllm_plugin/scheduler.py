"""vLLM's scheduler for TTT-E2E models: no request's step crosses a chunk boundary.

A request's fast weights change when a chunk of mini_batch_size tokens (positions 0, b, 2b, ...)
completes, and within one forward every suffix block runs over all of a step's tokens at once:
the weights must stay fixed for a step, so a prefill is cut at each boundary (decode steps are
one token and never cross). Prefills of long prompts take a step per chunk; requests still
share every step.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler


class ChunkAlignedScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ttt_chunk = self.vllm_config.model_config.hf_config.mini_batch_size
        # vLLM clips prefills of models with per-request state in one hook; it is extended here.
        self.vllm_aligned_split = self.need_mamba_block_aligned_split
        self.need_mamba_block_aligned_split = True

    def _mamba_block_aligned_split(self, request, num_new_tokens: int, num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        if self.vllm_aligned_split:
            num_new_tokens = super()._mamba_block_aligned_split(request, num_new_tokens, num_new_local_computed_tokens,
                                                                num_external_computed_tokens)
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        return min(num_new_tokens, self.ttt_chunk - start % self.ttt_chunk)
