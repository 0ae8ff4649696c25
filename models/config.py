"""PonderConfig: the Hugging Face config of Ponder's transformer (full attention, sliding window,
and TTT-E2E share one architecture; `mode` chooses)."""

from __future__ import annotations

from transformers import PretrainedConfig

from kernels.backend import check_backend

MODES = ("full", "swa", "ttt_e2e")
ROPE_TYPES = ("default", "linear", "llama3")  # RoPE frequency schemes models/model.py implements


def check_levels(chunk_sizes: list, inner_lrs: list, widths: list, mini_batch_size: int, prefix: str) -> None:
    """Continuum-memory levels: chunk sizes strictly increasing multiples of the base chunk, one
    inner lr and one width per level (or none). Raises ValueError naming the key (`prefix` + name)."""
    for c in chunk_sizes:
        if not isinstance(c, int) or c <= 0 or c % mini_batch_size:
            raise ValueError(f"{prefix}cms_chunk_sizes={chunk_sizes}: every level's chunk size must be a positive "
                             f"multiple of {prefix}mini_batch_size={mini_batch_size} (got {c})")
    if any(b <= a for a, b in zip(chunk_sizes, chunk_sizes[1:])):
        raise ValueError(f"{prefix}cms_chunk_sizes={chunk_sizes} must be strictly increasing (fastest level first)")
    for key, values, low in (("cms_inner_lrs", inner_lrs, 0), ("cms_widths", widths, 1)):
        if values and len(values) != len(chunk_sizes):
            raise ValueError(f"{prefix}{key}={values} needs one entry per level of {prefix}cms_chunk_sizes="
                             f"{chunk_sizes} ({len(chunk_sizes)}), or none")
        if any(v < low for v in values):
            raise ValueError(f"{prefix}{key}={values}: every entry must be >= {low}")


def check_shape(hidden_size: int, num_attention_heads: int, num_key_value_heads: int | None, num_hidden_layers: int,
                suffix_len: int | None, mode: str, cms_chunk_sizes: list, head_dim: int | None = None,
                prefix: str = "") -> None:
    """The rules a model's shape obeys, shared by PonderConfig and the training config's `model.*`
    (prefix "model."). Raises ValueError naming the key."""
    if head_dim is None and hidden_size % num_attention_heads:
        raise ValueError(f"{prefix}hidden_size={hidden_size} must be divisible by "
                         f"{prefix}num_attention_heads={num_attention_heads}")
    kv = num_key_value_heads
    if kv is not None and (kv <= 0 or num_attention_heads % kv):
        raise ValueError(f"{prefix}num_key_value_heads={kv} must divide {prefix}num_attention_heads="
                         f"{num_attention_heads} (or be null: one per query head)")
    if cms_chunk_sizes and mode != "ttt_e2e":
        raise ValueError(f"{prefix}cms_chunk_sizes={cms_chunk_sizes} needs {prefix}mode=ttt_e2e (got {mode})")
    if suffix_len is not None and not 1 <= suffix_len <= num_hidden_layers:
        raise ValueError(f"{prefix}suffix_len={suffix_len} must be in [1, {prefix}num_hidden_layers={num_hidden_layers}]")


class PonderConfig(PretrainedConfig):
    model_type = "ponder"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 384,
        mode: str = "full",
        sliding_window: int = 128,
        rope_theta: float = 10000.0,
        rope_scaling_params: dict | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        qk_norm: bool = True,
        pre_norm: bool = True,
        post_norm: bool = True,
        fast_post_norm: bool | None = None,
        max_position_embeddings: int = 8192,
        suffix_len: int | None = None,
        mini_batch_size: int = 1024,
        ttt_intermediate_size: int | None = None,
        ttt_inner_lr: float = 1.0,
        ttt_clip: float = 1.0,
        ttt_grad: str = "second_order",
        ttt_recompute: bool = False,
        ttt_update_during_decode: bool = True,
        cms_chunk_sizes: list[int] | None = None,
        cms_inner_lrs: list[float] | None = None,
        cms_widths: list[int] | None = None,
        loss_average: str | None = None,
        kernels: str = "auto",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        if mode not in MODES:
            raise ValueError(f"PonderConfig.mode={mode!r}: must be one of {MODES}")
        suffix_len = max(1, num_hidden_layers // 4) if suffix_len is None else suffix_len
        check_shape(hidden_size, num_attention_heads, num_key_value_heads, num_hidden_layers, suffix_len, mode,
                    cms_chunk_sizes or [], head_dim)
        num_key_value_heads = num_key_value_heads or num_attention_heads
        rope_type = (rope_scaling_params or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling_params rope_type={rope_type!r} is not implemented; "
                             f"implemented: {list(ROPE_TYPES)}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Grouped-query attention: every key/value head serves num_attention_heads // num_key_value_heads
        # consecutive query heads (Llama's and Qwen3's layout).
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.mode = mode
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        # None (plain RoPE) or Hugging Face's rope_parameters of a scaled one; not named rope_scaling,
        # which PretrainedConfig aliases to its own rope_parameters.
        self.rope_scaling_params = rope_scaling_params  # {"rope_type": "linear" | "llama3", ...}
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.qk_norm = qk_norm
        self.pre_norm = pre_norm
        self.post_norm = post_norm
        # The norm on the fast MLP's output, whatever the other sublayers have (None: as post_norm).
        # A converted Llama/Qwen3 has no post-norms but gets this one, its gain at zero (models/convert.py).
        self.fast_post_norm = post_norm if fast_post_norm is None else fast_post_norm
        self.max_position_embeddings = max_position_embeddings
        # TTT-E2E: the last `suffix_len` blocks (a quarter by default) get a fast-weight MLP that
        # trains on every chunk of `mini_batch_size` tokens with SGD at `ttt_inner_lr`, its update
        # clipped to global norm `ttt_clip`.
        self.suffix_len = suffix_len
        self.mini_batch_size = mini_batch_size
        self.ttt_intermediate_size = ttt_intermediate_size
        self.ttt_inner_lr = ttt_inner_lr
        self.ttt_clip = ttt_clip
        if ttt_grad not in ("second_order", "first_order"):
            raise ValueError(f"ttt_grad={ttt_grad!r}: must be 'second_order' or 'first_order'")
        self.ttt_grad = ttt_grad
        self.ttt_recompute = ttt_recompute
        self.ttt_update_during_decode = ttt_update_during_decode
        # Continuum memory (models/memory.py): one fast MLP per level in every suffix block, level l
        # updated every cms_chunk_sizes[l] tokens at inner lr cms_inner_lrs[l] (null: ttt_inner_lr),
        # cms_widths[l] wide (null: mlp_width). Empty: TTT-E2E's single fast MLP.
        self.cms_chunk_sizes = list(cms_chunk_sizes or [])
        self.cms_inner_lrs = list(cms_inner_lrs or [])
        self.cms_widths = list(cms_widths or [])
        if self.cms_chunk_sizes:
            check_levels(self.cms_chunk_sizes, self.cms_inner_lrs, self.cms_widths, mini_batch_size, prefix="")
        # The training loss over a batch: "chunk" is TTT-E2E's (per sequence, the unweighted mean
        # over chunks of mini_batch_size tokens of each chunk's masked mean; then over sequences),
        # "token" the mean over every unmasked target. None: chunk for ttt_e2e, token otherwise.
        if loss_average not in (None, "chunk", "token"):
            raise ValueError(f"loss_average={loss_average!r}: must be 'chunk', 'token' or None")
        self.loss_average = loss_average or ("chunk" if mode == "ttt_e2e" else "token")
        # Ops of TTT-E2E's suffix and inner loop (fast SwiGLU, twice-differentiable attention,
        # clipped update, head loss): "triton", "torch", or "auto" (Triton on CUDA, torch on CPU).
        self.kernels = check_backend(kernels)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def is_ttt(self) -> bool:
        return self.mode == "ttt_e2e"

    @property
    def num_levels(self) -> int:
        """Fast MLPs per suffix block: one for TTT-E2E, one per continuum-memory level."""
        return max(1, len(self.cms_chunk_sizes))

    @property
    def mlp_width(self) -> int:
        """Width of every MLP. TTT-E2E's suffix blocks carry a second (fast) MLP, so all MLPs
        shrink to keep the parameter count of the plain model: I·L/(L+S), rounded up to a
        multiple of 128 (32 for widths under 1024). This gives the released widths of every shape
        (2048 -> 1664 at 125M ... 6912 -> 5632 at 3B). With k continuum-memory levels a suffix
        block carries k fast MLPs: I·L/(L+S·k)."""
        if not self.is_ttt:
            return self.intermediate_size
        if self.ttt_intermediate_size:
            return self.ttt_intermediate_size
        L, S = self.num_hidden_layers, self.suffix_len * self.num_levels
        multiple = 128 if self.intermediate_size >= 1024 else 32
        return -(-self.intermediate_size * L // ((L + S) * multiple)) * multiple

    @property
    def level_widths(self) -> list[int]:
        """Width of every suffix block's fast MLP of each level, fastest first."""
        return self.cms_widths or [self.mlp_width] * self.num_levels

    @property
    def level_inner_lrs(self) -> list[float]:
        """Inner learning rate of each level at the end of the inner-lr warmup."""
        return self.cms_inner_lrs or [self.ttt_inner_lr] * self.num_levels

    @property
    def attention_window(self) -> int | None:
        """Keys a query sees (None: all earlier ones)."""
        return None if self.mode == "full" else self.sliding_window
