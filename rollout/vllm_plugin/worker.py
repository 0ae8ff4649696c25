"""Methods vLLM mixes into its workers (`worker_extension_cls`): they become collective_rpc calls
of the vLLM engine (rollout/vllm_engine.py). Importing this module in a worker also registers
Ponder's models there, before vLLM loads one."""

from __future__ import annotations

import logging

from rollout.vllm_plugin import CONTEXT_END, register

register()


def _not_rope_reload(record: logging.LogRecord) -> bool:
    return record.getMessage() != "RotaryEmbedding: Failed to load weights"


class PonderWorkerExtension:
    """Methods run inside each vLLM worker (`self` is the worker), called by collective_rpc."""

    def ponder_load_weights(self, blob: bytes) -> None:
        """Load a state dict (safetensors bytes) in place. A Ponder model's parameters are plain
        torch, loaded name for name. Other architectures go through vLLM's own reload, which
        restores each layer's checkpoint layout, loads, and repacks it for the kernels (vLLM's
        CPU backend repacks linear weights, so a plain load_weights no longer fits)."""
        from safetensors.torch import load

        from rollout.vllm_plugin.model import PonderVLLMForCausalLM

        model = self.model_runner.model
        if isinstance(model, PonderVLLMForCausalLM):
            model.load_weights(load(blob).items())
            return
        # Layers without checkpoint weights (RoPE's cached table) keep theirs, and vLLM says so each time.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_not_rope_reload)
        self.reload_weights(weights_iterator=iter(load(blob).items()), is_checkpoint_format=True)

    def ponder_seed(self, seed: int) -> None:
        """Seed the generator vLLM's sampler draws from for requests without a seed of their own.
        (Per-request seeds would do, but vLLM rewinds their generators after a partial prefill by
        an offset that only CUDA generators have.)"""
        import torch

        torch.manual_seed(seed)

    def ponder_scale_logits(self, factor: float) -> None:
        """Scale the model's logits by `factor` (on top of any scale the architecture has)."""
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        processors = [m for m in self.model_runner.model.modules() if isinstance(m, LogitsProcessor)]
        if not processors:
            raise RuntimeError("this architecture has no LogitsProcessor: the vLLM engine cannot apply a temperature")
        for m in processors:
            base = m.__dict__.setdefault("_ponder_base_scale", m.scale)
            m.scale = base * factor

    def ponder_follow_context_ends(self) -> None:
        """Let the model read where each request's context ends (SamplingParams.extra_args'
        CONTEXT_END, else the prompt's length), in the order of the requests of its forward: the
        runner's batch order, which its attention metadata follows."""
        runner = self.model_runner

        def context_ends(num_requests: int) -> list[int]:
            ends = []
            for req_id in runner.input_batch.req_ids[:num_requests]:
                request = runner.requests[req_id]
                extra = (request.sampling_params.extra_args if request.sampling_params else None) or {}
                ends.append(int(extra.get(CONTEXT_END, request.num_prompt_tokens)))
            return ends

        runner.get_model().context_ends = context_ends
