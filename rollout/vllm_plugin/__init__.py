"""vLLM's out-of-tree Ponder model: full attention, sliding window, and TTT-E2E with every
sequence's fast weights kept as vLLM per-request state (the mechanism vLLM's Mamba layers use).

vLLM finds it through the `vllm.general_plugins` entry point in pyproject.toml, which calls
`register` in every vLLM process. The vLLM engine (rollout/vllm_engine.py) also calls it before
vLLM starts, and its worker extension imports this package in vLLM's workers, so the model is
found where the installed metadata predates the entry point.

Two architecture names: TTT-E2E models are served as ARCH_TTT (a hybrid model with per-request
state: vLLM sizes and schedules such models apart), full and sliding-window ones as ARCH (the
name their config.json carries). The vLLM engine passes the override, and for TTT-E2E the
scheduler SCHEDULER, which ends every request's step at its next chunk boundary.
"""

ARCH = "PonderForCausalLM"
ARCH_TTT = "PonderTTTForCausalLM"
SCHEDULER = "rollout.vllm_plugin.scheduler.ChunkAlignedScheduler"
# A request's SamplingParams.extra_args entry: where its context ends and sampled tokens begin
# (default: its prompt's length). A TTT-E2E model with ttt_update_during_decode=false learns from
# chunks of the context only.
CONTEXT_END = "ponder_context_end"


def unservable_reason(config, cuda: bool) -> str | None:
    """Why vLLM cannot serve a Ponder model with this PonderConfig (None: it can). `cuda`: on a GPU."""
    if config.head_dim < 32 and not cuda:
        return f"head_dim={config.head_dim}, and vLLM's CPU attention needs a head size of at least 32"
    if config.is_ttt and config.num_levels > 1:
        return (f"continuum memory (cms_chunk_sizes={config.cms_chunk_sizes}); the vLLM model serves TTT-E2E with "
                "one fast MLP per suffix block")
    return None


def register() -> None:
    """Make Ponder's config known to transformers' AutoConfig and its model classes to vLLM.
    Safe to call many times, in any process."""
    import models  # noqa: F401  (registers PonderConfig with AutoConfig)
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    if ARCH not in supported:
        ModelRegistry.register_model(ARCH, "rollout.vllm_plugin.model:PonderVLLMForCausalLM")
    if ARCH_TTT not in supported:
        ModelRegistry.register_model(ARCH_TTT, "rollout.vllm_plugin.model:PonderTTTVLLMForCausalLM")
