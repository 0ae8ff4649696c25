"""Structured configs: one YAML per pipeline under configs/, groups (model/, data/, ...) chosen by
name, `key=value` overrides on the command line, all checked against the dataclasses below.

    cfg = load_config(PretrainConfig, "configs/ttt_pretrain.yaml", ["model=125m", "optim.lr=1e-3"])

A wrong key fails at start naming the key and its nearest valid spellings; a value out of range
fails naming the key and the rule it breaks. Range rules live beside each field (`check=`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.config import check_levels, check_shape

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what would be right."""


def _field(default: Any, rule: str | None = None, ok: Callable[[Any], bool] | None = None):
    meta = {"rule": rule, "ok": ok} if ok is not None else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def positive(default):
    return _field(default, "must be > 0", lambda v: v > 0)


def non_negative(default):
    return _field(default, "must be >= 0", lambda v: v >= 0)


def fraction(default, *, open_low: bool = False):
    if open_low:
        return _field(default, "must be in (0, 1]", lambda v: 0 < v <= 1)
    return _field(default, "must be in [0, 1)", lambda v: 0 <= v < 1)


def one_of(default, *choices):
    return _field(default, f"must be one of {list(choices)}", lambda v: v in choices)


# --------------------------------------------------------------------------------------------
# Schemas


@dataclass
class ModelConfig:
    name: str = "tiny"
    # None: take the tokenizer's vocabulary size. The released shapes state Llama-3's 128256.
    vocab_size: int | None = None
    hidden_size: int = positive(128)
    num_hidden_layers: int = positive(4)
    num_attention_heads: int = positive(4)
    # grouped-query attention: key/value heads, each shared by consecutive query heads (null: one per query head)
    num_key_value_heads: int | None = None
    intermediate_size: int = positive(384)
    # full: causal attention over everything; swa: every block attends to the last
    # `sliding_window` keys; ttt_e2e: swa plus fast-weight MLPs in the suffix blocks.
    mode: str = one_of("full", "full", "swa", "ttt_e2e")
    sliding_window: int = positive(128)
    rope_theta: float = positive(10000.0)
    rms_norm_eps: float = positive(1e-6)
    initializer_range: float = positive(0.02)
    qk_norm: bool = True
    pre_norm: bool = True
    post_norm: bool = True
    tie_word_embeddings: bool = True  # false: the output projection is a matrix of its own
    max_position_embeddings: int = positive(8192)
    # TTT-E2E only: how many of the last blocks carry fast weights (null: a quarter), and the
    # tokens per inner-loop chunk.
    suffix_len: int | None = None
    mini_batch_size: int = positive(32)
    # Continuum memory (models/memory.py, methods.md §5): one fast MLP per level in every suffix
    # block, level l updated every cms_chunk_sizes[l] tokens (strictly increasing multiples of
    # mini_batch_size, e.g. [32, 128, 512]); [] is TTT-E2E's single fast MLP. Per level, the inner lr
    # at the end of the warmup ([]: ttt.inner_lr for all) and the width ([]: the MLP width, shrunk
    # so the parameter count matches the plain model).
    cms_chunk_sizes: list = _field([])
    cms_inner_lrs: list = _field([])
    cms_widths: list = _field([])

    def validate(self) -> None:
        try:
            check_shape(self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.num_hidden_layers,
                        self.suffix_len, self.mode, self.cms_chunk_sizes, prefix="model.")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_attention_heads (the head dim) must be even for RoPE")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be > 0 (or null: the tokenizer's size)")
        try:
            check_levels(self.cms_chunk_sizes, self.cms_inner_lrs, self.cms_widths, self.mini_batch_size, prefix="model.")
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class TTTConfig:
    """The TTT-E2E inner loop (used when model.mode=ttt_e2e)."""

    grad: str = one_of("second_order", "second_order", "first_order")
    inner_lr: float = positive(1.0)
    inner_lr_init: float = non_negative(0.1)  # warms linearly to inner_lr ...
    inner_lr_warmup: float = fraction(0.1)  # ... over this fraction of the outer steps
    # The bridge of a converted model (base=...): for this many first steps only the fast MLPs
    # (W_0 and their norms) train, the slow weights keep the source's values. 0: all train at once.
    freeze_slow_steps: int = non_negative(0)
    clip: float = positive(1.0)  # global-norm clip of each inner update, over all suffix layers
    update_during_decode: bool = True
    # Recompute each chunk in the backward instead of keeping its activations: memory stops
    # growing with the number of chunks beyond the chain of fast weights.
    recompute: bool = False
    # The training loss's average: chunk (TTT-E2E's official objective: per sequence, the mean
    # over chunks of each chunk's masked mean) or token (over all unmasked targets).
    # null: chunk with model.mode=ttt_e2e, token for full and swa.
    loss_average: str | None = one_of(None, "chunk", "token")
    # Evaluation reads the held-out windows as streams of consecutive windows, carrying the
    # attention cache and every level's fast weights from one window to the next (full, swa and
    # ttt_e2e alike; training/long_context.py).
    carry_state: bool = False
    # Training through the carried state (needs carry_state; model.mode ttt_e2e or swa): K > 0 makes
    # every batch row read a stream of carry_stream_windows consecutive windows, K windows per
    # optimiser step, carrying its state (attention cache, every level's fast weights and sums)
    # from window to window and step to step. A step backpropagates through its K windows; the
    # state carried into it counts as fixed (truncated backprop through time), and each stream
    # starts afresh from W_0. 0: independent windows (training/carry.py).
    carry_backprop_windows: int = non_negative(0)
    carry_stream_windows: int = positive(8)  # a multiple of carry_backprop_windows

    @property
    def windows_per_step(self) -> int:
        """Consecutive windows every batch row reads per optimiser step (1 unless training through
        the carried state)."""
        return max(1, self.carry_backprop_windows)


# Short documents whose answer is hard to predict without working it out. gsm_symbolic (GSM8K
# word problems) carries a worked solution (metadata["answer_cot"]); the others carry none:
# mixed + - * / with parentheses, multi-digit products, and legs per animal times counts.
DEFAULT_TASKS: tuple[str, ...] = ("gsm_symbolic", "basic_arithmetic", "products", "leg_counting")


@dataclass
class DataConfig:
    # "embedded" (the reasoning-gym corpus made offline) or a path/glob to json, jsonl,
    # parquet or text files.
    source: str = "embedded"
    format: str = one_of("auto", "auto", "json", "jsonl", "parquet", "text")
    text_field: str = "text"
    num_docs: int = positive(20000)  # size of the embedded corpus
    heldout_fraction: float = fraction(0.05)
    seq_len: int = positive(256)  # tokens per training window
    vocab_size: int = positive(4096)  # of the tokenizer trained on the corpus
    tokenizer: str = ""  # a saved tokenizer to use; empty: <run dir>/tokenizer (trained if absent)
    # tpt: append <think> thinking </think> to every train document (methods.md §3), the
    # thinking read from `thinking_field` (the embedded corpus's worked solutions by default,
    # or what pipelines/tpt_augment.py wrote).
    # think: the thinking inserted as "<think> ... </think>" at a random position of the document,
    # which then reads on (RLP's setting: the base RLP starts from learns to write thoughts,
    # close them and continue). Thinking tokens are counted apart from data tokens, as in TPT.
    augment: str = one_of("none", "none", "tpt", "think")
    # The embedded corpus's tasks: reasoning-gym generators and worked_arithmetic
    # (training/arithmetic.py).
    tasks: list = _field(list(DEFAULT_TASKS), "must be a non-empty list of task names", lambda v: len(v) > 0)
    thinking_field: str = "solution"
    # Mask the targets that begin a new document in a packed window (the token after each
    # end-of-document separator), as TTT-E2E's official pipeline does: neither the loss nor the
    # inner loop learns to guess a document's first token from the one before it.
    mask_boundary_targets: bool = True
    cache_dir: str = ".cache/ponder"

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("data.source is empty: give data.source=embedded or a path to json, jsonl, parquet or text files")


@dataclass
class OptimConfig:
    lr: float = positive(3e-3)
    end_lr: float = non_negative(3e-5)  # the cosine decays to this
    warmup_steps: int = non_negative(50)
    weight_decay: float = non_negative(0.1)
    beta1: float = fraction(0.9)
    beta2: float = fraction(0.95)
    grad_clip: float = positive(1.0)


@dataclass
class LoopConfig:
    steps: int = positive(500)
    # > 0: train on this many data tokens instead (steps follow from it, thinking tokens of
    # TPT not counted), so methods compare at equal corpus tokens.
    data_tokens: int = non_negative(0)
    batch_size: int = positive(16)
    log_every: int = positive(10)
    eval_every: int = positive(100)
    eval_windows: int = positive(64)  # held-out windows per evaluation
    task_problems: int = non_negative(0)  # held-out problems answered per evaluation (eval/task_acc); 0: off
    task_max_new_tokens: int = positive(16)  # answer tokens written after "Answer:"
    # > 0: also answer after a greedy thought of at most this many tokens (eval/*_think)
    task_think_tokens: int = non_negative(0)
    save_every: int = positive(100)
    # true: capture each training step's forward and backward as a CUDA graph and replay it (fixed
    # shapes; CUDA only; any step that cannot be captured runs eagerly, said once)
    cuda_graphs: bool = False


@dataclass
class WandbConfig:
    mode: str = one_of("offline", "offline", "online", "disabled")
    project: str = "ponder"
    entity: str = ""


@dataclass
class PretrainConfig:
    run_name: str = "ttt_pretrain"
    out_dir: str = "runs"
    seed: int = 0
    # true: continue the run at out_dir/run_name (an error if there is none); false: start afresh
    # (an earlier run of that name is moved aside); auto: continue it if it exists, else start.
    resume: Any = _field(False, "must be true, false or auto", lambda v: v in (True, False, "auto"))
    device: str = one_of("auto", "auto", "cpu", "cuda")
    dtype: str = one_of("float32", "float32", "bfloat16")
    # A saved Ponder model to train from (e.g. pipelines/convert_hf.py's output: the bridge of a
    # converted transformer); its shape replaces model.*, ttt.* still applies. Empty: from scratch.
    base: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} must be <= train.steps={self.train.steps}"
            )
        if self.optim.end_lr > self.optim.lr:
            raise ConfigError(f"optim.end_lr={self.optim.end_lr} must be <= optim.lr={self.optim.lr}")
        check_carry_backprop(self.ttt, None if self.base else self.model.mode)


def check_carry_backprop(ttt: TTTConfig, mode: str | None) -> None:
    """ttt.carry_backprop_windows needs a state that is carried and bounded (mode None: not known yet)."""
    k = ttt.carry_backprop_windows
    if not k:
        return
    if not ttt.carry_state:
        raise ConfigError(f"ttt.carry_backprop_windows={k} needs ttt.carry_state=true")
    if mode is not None and mode not in ("ttt_e2e", "swa"):
        raise ConfigError(f"ttt.carry_backprop_windows={k} needs model.mode=ttt_e2e or swa (got {mode}: full "
                          "attention's cache would grow without bound across windows)")
    if ttt.carry_stream_windows % k:
        raise ConfigError(f"ttt.carry_stream_windows={ttt.carry_stream_windows} must be a multiple of "
                          f"ttt.carry_backprop_windows={k}")


@dataclass
class RLPConfig:
    """RLP (methods.md §1): thoughts sampled at positions of the corpus, rewarded by information gain."""

    group_size: int = _field(4, "must be >= 2 (advantages need a group baseline)", lambda v: v >= 2)
    positions_per_window: int = positive(1)  # positions sampled per context window
    # uniform over t >= min_context, or in proportion to the EMA teacher's next-token entropy at t
    position_sampling: str = one_of("uniform", "uniform", "entropy")
    min_context: int = positive(16)  # a position t has at least this many tokens before it
    thought_max_tokens: int = positive(24)
    temperature: float = positive(0.7)
    top_p: float = fraction(1.0, open_low=True)
    clip_low: float = fraction(0.2)  # PPO clip: ratio kept in [1 - clip_low, 1 + clip_high]
    clip_high: float = non_negative(0.2)
    ema_decay: float = fraction(0.999)  # τ of the EMA teacher
    rlp_weight: float = non_negative(1.0)  # w_rlp
    ttt_weight: float = non_negative(1.0)  # λ: the next-token (TTT-E2E meta-learning) loss over the window
    # A rollout sampled more than max_staleness versions before the learner's is dropped (and
    # counted); rollout.asynchronous samples one version behind.
    max_staleness: int = non_negative(1)
    # The policy ratio π_θ/π_sampling is truncated at is_cap (dual-clip PPO's c): a stale token
    # with a large ratio cannot dominate a negative advantage.
    is_cap: float = _field(3.0, "must be > 1", lambda v: v > 1)
    # The run stops when more than max_dropped_frac of the rewards were dropped (raised, NaN,
    # None) in each of max_dropped_steps consecutive steps.
    max_dropped_frac: float = fraction(0.5, open_low=True)
    max_dropped_steps: int = positive(3)


@dataclass
class RolloutConfig:
    engine: str = one_of("torch", "torch", "vllm")
    num_workers: int = positive(2)
    windows_per_step: int = positive(4)  # context windows per learner step, split across workers
    # Sample the next step's thoughts while the learner trains this one (one version behind).
    asynchronous: bool = True
    timeout_s: float = positive(600.0)  # a worker silent this long is left out of the step (counted)
    # Ray resources of each worker; a fraction of a GPU lets several engines share one.
    gpus_per_worker: float = non_negative(0.0)
    cpus_per_worker: float = non_negative(0.5)
    placement: str = one_of("pack", "pack", "spread")  # the workers' placement group strategy


@dataclass
class SyncConfig:
    """How new weights reach the rollout engines (rollout/sync.py)."""

    # collective: learner rank 0 broadcasts them over a process group joining it with every engine
    # (NCCL on GPU, gloo on CPU); object_store: one copy in Ray's object store that every worker reads.
    method: str = one_of("object_store", "object_store", "collective")
    bucket_mb: float = positive(64.0)  # tensors flattened into broadcasts of about this size


@dataclass
class LearnerConfig:
    """The learner's ranks: Ray actors in one torch.distributed group, FSDP2 over the prefix
    blocks when num_ranks > 1 (training/distributed.py). Each rank uses the GPU Ray gives it,
    else the CPU."""

    num_ranks: int = positive(1)
    gpus_per_rank: int = _field(0, "must be 0 or 1 (one rank drives one GPU)", lambda v: v in (0, 1))
    cpus_per_rank: float = positive(1.0)
    placement: str = one_of("pack", "pack", "spread")
    # Seconds to wait for the cluster to place the actors before failing (never PENDING forever).
    placement_timeout_s: float = positive(120.0)
    # true: a checkpoint's shards are copied to host memory and written by a thread while the next
    # step's rollouts run (DCP async_save); it becomes the newest checkpoint as the next step trains
    async_save: bool = True


@dataclass
class PretrainStageConfig:
    """The brief pretraining that makes a base model when `base` is empty."""

    steps: int = positive(200)
    lr: float = positive(3e-3)
    batch_size: int = positive(16)
    eval_every: int = positive(100)
    save_every: int = positive(100)  # checkpoints of the base pretraining (resume=true continues it)
    # The base's documents: think inserts each worked solution as a thought, so the policy
    # starts out writing thoughts and closing them (see data.augment).
    augment: str = one_of("think", "none", "tpt", "think")


@dataclass
class FormatWarmupConfig:
    """The format warm-up of a given base (`base=`): next-token training on the corpus with its
    worked solutions written as thoughts (data.augment=think), tokenized with the base's own
    tokenizer, so that a pretrained model writes and closes <think> ... </think> before RLP."""

    steps: int = non_negative(0)  # 0: off
    lr: float = positive(3e-4)
    batch_size: int = positive(8)
    eval_every: int = positive(50)
    save_every: int = positive(25)  # checkpoints of the warm-up (resume=true continues it)
    # held-out windows whose thoughts are probed before and after (closed share, information gain)
    probe_windows: int = positive(8)
    target_closed_frac: float = fraction(0.9, open_low=True)  # below it after the warm-up: a warning to give more steps


@dataclass
class RLPMidtrainConfig(PretrainConfig):
    """Everything of pretraining (model, data, optimiser, loop, ...) plus RLP's own sections."""

    run_name: str = "rlp_midtrain"
    # A model directory (save_pretrained) to start from; empty: pretrain one first with `pretrain`.
    base: str = ""
    # A registered reward name or "package.module:function".
    reward: str = "rlp_info_gain"
    ray_address: str = ""  # empty: join the cluster of `ray job submit`, or start a local one
    rlp: RLPConfig = field(default_factory=RLPConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    pretrain: PretrainStageConfig = field(default_factory=PretrainStageConfig)
    warmup: FormatWarmupConfig = field(default_factory=FormatWarmupConfig)

    def validate(self) -> None:
        super().validate()
        if self.warmup.steps and not self.base:
            raise ConfigError(f"warmup.steps={self.warmup.steps} warms up a given base=; without one, the base "
                              "pretraining (pretrain.augment=think) teaches the format already")
        if self.train.task_think_tokens:  # one key for one setting: the thought length is rlp.thought_max_tokens
            raise ConfigError(f"train.task_think_tokens={self.train.task_think_tokens} is pretraining's key: RLP and RPT "
                              "answer after thoughts of rlp.thought_max_tokens; give rlp.thought_max_tokens instead")
        if self.rollout.windows_per_step % self.learner.num_ranks:
            raise ConfigError(f"rollout.windows_per_step={self.rollout.windows_per_step} must be divisible by "
                              f"learner.num_ranks={self.learner.num_ranks} (each rank trains an equal share)")
        if self.rlp.min_context >= self.data.seq_len:
            raise ConfigError(f"rlp.min_context={self.rlp.min_context} must be < data.seq_len={self.data.seq_len}")
        from rewards import get_reward  # fail at start, listing the registered rewards

        try:
            get_reward(self.reward)
        except ValueError as e:
            raise ConfigError(f"reward={self.reward}: {e}") from None


@dataclass
class RPTConfig:
    """RPT's own settings (methods.md §2); the GRPO settings it shares with RLP live in rlp.*."""

    # A saved causal LM (save_pretrained) whose next-token entropy picks the positions; its
    # vocabulary must be the policy's. Empty: the base itself.
    proxy: str = ""
    # A position t is kept when the proxy's entropy over its entropy_top_k most likely next tokens
    # (renormalised over them) is above this many nats.
    entropy_threshold: float = non_negative(0.5)
    entropy_top_k: int = _field(16, "must be >= 2", lambda v: v >= 2)
    # A response (a thought, </think>, then \\boxed{prediction}) ends at the eos token or here.
    response_max_tokens: int = positive(48)
    eval_positions: int = non_negative(64)  # held-out positions (proxy entropy > 0.5) per evaluation; 0: off


@dataclass
class RPTTrainConfig(RLPMidtrainConfig):
    """RPT on RLP's Ray graph: the same rollout pool, learner group and weight sync; positions by
    the proxy's entropy, responses rewarded by prefix match, no next-token loss, no KL."""

    run_name: str = "rpt_train"
    reward: str = "rpt_prefix_match"
    rpt: RPTConfig = field(default_factory=RPTConfig)

    def validate(self) -> None:
        super().validate()
        if not self.base:
            raise ConfigError("base is empty: give base=<a save_pretrained causal LM dir> (a Ponder model, e.g. "
                              "runs/rlp_midtrain/base/model, or a Hugging Face one) for RPT to train")
        if self.warmup.steps:
            raise ConfigError(f"warmup.steps={self.warmup.steps} is rlp_midtrain's format warm-up; RPT's responses "
                              "have a format of their own")


METHODS = ("ntp_plain", "ntp_ttt", "tpt", "ttt_warm", "cpt", "rlp", "rlp_plain", "rlp_pure", "cpt_flops")


@dataclass
class CompareConfig:
    """Several methods on one corpus, seed and data-token budget (pipelines/compare.py)."""

    out_dir: str = "runs/compare"
    seed: int = 0
    # Several seeds: the methods once per seed, each from its own corpus draw and base, in
    # <out_dir>/seed_<s>/, then statistics across seeds (training/seed_grid.py). Empty: `seed` alone.
    seeds: list = _field([], "must be a list of distinct integers",
                         lambda v: all(isinstance(s, int) for s in v) and len(set(v)) == len(v))
    methods: list = _field(list(METHODS), f"must be a non-empty list drawn from {list(METHODS)}",
                           lambda v: len(v) > 0 and all(m in METHODS for m in v))
    budget_tokens: int = positive(400_000)  # data tokens every method trains on
    eval_points: int = positive(5)  # evaluations along each run
    task_problems: int = non_negative(256)  # held-out problems per evaluation, with and without a thought
    # cpt, rlp and rlp_plain: the share of the budget after their shared base (which gets the rest)
    rlp_fraction: float = fraction(0.25, open_low=True)
    batch_size: int = positive(16)  # windows per step of pretraining
    lr: float = positive(3e-3)  # pretraining (from scratch and the bases)
    mid_lr: float = positive(3e-4)  # cpt and rlp alike, after the base
    # ttt_warm: the share of its budget spent bridging the converted plain model (the rest pretrains it)
    warm_fraction: float = _field(0.25, "must be in (0, 1)", lambda v: 0 < v < 1)
    warm_lr: float = positive(1e-3)  # ttt_warm's bridge
    windows_per_step: int = positive(16)  # cpt and rlp alike
    reward: str = "rlp_info_gain"
    rlp: RLPConfig = field(default_factory=RLPConfig)
    tag: str = ""  # appended to the method runs' names (an ablation beside the main runs)
    # Thought lengths each method's final model is also evaluated at, besides its own
    # (rlp.thought_max_tokens): <run>/task_eval_think<n>.json
    eval_think_tokens: list = _field([], "must be a list of positive integers",
                                     lambda v: all(isinstance(n, int) and n > 0 for n in v))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


LONG_CONTEXT_ARMS = ("full", "swa", "ttt_e2e", "cms")


@dataclass
class LongContextConfig:
    """Loss by position beyond the window (pipelines/long_context.py): full attention, SWA, TTT-E2E
    and continuum memory trained on the same long documents, tokens and (near) parameter count,
    each evaluated with and without state carried across windows."""

    out_dir: str = "runs/long_context"
    seed: int = 0
    arms: list = _field(list(LONG_CONTEXT_ARMS), f"must be a non-empty list drawn from {list(LONG_CONTEXT_ARMS)}",
                        lambda v: len(v) > 0 and all(a in LONG_CONTEXT_ARMS for a in v))
    cms_chunk_sizes: list = _field([16, 64])  # the cms arm's levels (model.cms_chunk_sizes)
    data_tokens: int = positive(400_000)  # every arm trains on this many corpus tokens
    batch_size: int = positive(8)
    lr: float = positive(3e-3)
    eval_windows_of_context: int = positive(8)  # positions evaluated: this many sliding windows
    eval_segments: int = positive(64)  # held-out segments of that length (cut from the held-out documents)
    reuse: bool = False  # true: an arm already trained in out_dir is evaluated again, not retrained
    model: ModelConfig = field(default_factory=ModelConfig)
    # data.source: long text files, one document per file (a folder, a file or a glob)
    data: DataConfig = field(default_factory=DataConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)


@dataclass
class ConvertModelConfig:
    """What the conversion chooses; every other shape comes from the source."""

    suffix_len: int | None = None  # blocks that get a fast MLP (null: the last quarter)
    sliding_window: int = positive(8192)  # keys each query attends to (the released TTT-E2E window)
    mini_batch_size: int = positive(1024)  # tokens per inner-loop chunk (as released)


@dataclass
class ConvertConfig:
    """A Hugging Face Llama / Qwen3 checkpoint as a TTT-E2E Ponder model (pipelines/convert_hf.py)."""

    source: str = ""  # a save_pretrained LlamaForCausalLM or Qwen3ForCausalLM directory
    out: str = ""  # where the Ponder model and the source's tokenizer files are written
    model: ConvertModelConfig = field(default_factory=ConvertModelConfig)

    def validate(self) -> None:
        if not self.source or not self.out:
            raise ConfigError("give source=<a Llama or Qwen3 save_pretrained dir> and out=<a dir for the Ponder model>")


@dataclass
class TPTAugmentConfig:
    """TPT's thinking written by a model (pipelines/tpt_augment.py)."""

    model: str = ""  # a save_pretrained model dir that writes the thinking (required)
    tokenizer: str = ""  # its tokenizer dir (empty: <model>/../tokenizer)
    out: str = "runs/tpt_corpus/documents.jsonl"
    data: DataConfig = field(default_factory=DataConfig)
    max_docs: int = non_negative(0)  # 0: every document
    max_thinking_tokens: int = positive(128)  # the paper allows 8k
    temperature: float = positive(0.6)
    top_p: float = fraction(0.9, open_low=True)
    num_workers: int = positive(2)
    seed: int = 0
    ray_address: str = ""

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model is empty: give model=<a save_pretrained model dir> to write the thinking")


# --------------------------------------------------------------------------------------------
# Loading

GROUPS = ("model", "data")


def load_config(schema: type, yaml_path: str | Path, overrides: Sequence[str] = ()):
    """Compose `yaml_path` (its `defaults:` pick one YAML per group), apply `key=value`
    overrides, check every key and value, and return an instance of `schema`."""
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise ConfigError(f"config file {yaml_path} does not exist")
    pipeline = OmegaConf.to_container(OmegaConf.load(yaml_path))
    defaults = dict(pipeline.pop("defaults", None) or {})

    group_choice, dotlist = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key in GROUPS and dataclasses.is_dataclass(typing.get_type_hints(schema).get(key)):
            group_choice[key] = value
        else:
            dotlist.append(item)
    defaults.update(group_choice)

    layers: list[tuple[str, dict]] = []
    for group, name in defaults.items():
        group_file = CONFIG_DIR / group / f"{name}.yaml"
        if not group_file.is_file():
            choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            raise ConfigError(f"{group}={name}: no such config; choose one of {choices}")
        layers.append((str(group_file), {group: OmegaConf.to_container(OmegaConf.load(group_file)) or {}}))
    layers.append((str(yaml_path), pipeline))
    try:
        layers.append(("the command line", OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))))
    except OmegaConfBaseException as e:
        raise ConfigError(f"could not parse overrides {dotlist}: {e}") from None

    cfg: DictConfig = OmegaConf.structured(schema)
    for origin, layer in layers:
        _check_keys(layer, schema, "", origin)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e} (from {origin})") from None
    obj = OmegaConf.to_object(cfg)
    _check_values(obj, "")
    return obj


def _check_keys(layer: dict, schema: type, prefix: str, origin: str) -> None:
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in layer.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key {prefix + key!r} (from {origin}){hint} "
                f"Valid keys here: {sorted(names)}"
            )
        sub = typing.get_type_hints(schema)[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key} is a section ({sorted(f.name for f in dataclasses.fields(sub))}), not a value")
            _check_keys(value, sub, f"{prefix}{key}.", origin)


def check_config(cfg: Any) -> None:
    """Every value of a config built in code checked as load_config checks a loaded one."""
    _check_values(cfg, "")


def _check_values(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_values(value, f"{prefix}{f.name}.")
        elif "ok" in f.metadata and value is not None and not f.metadata["ok"](value):
            raise ConfigError(f"{prefix}{f.name}={value!r} {f.metadata['rule']}")
    if hasattr(obj, "validate"):
        obj.validate()


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
