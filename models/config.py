"""PonderConfig: the Hugging Face config of Ponder's transformer (full attention, sliding window,
and TTT-E2E share one architecture; `mode` chooses)."""

from __future__ import annotations

from transformers import PretrainedConfig

MODES = ("full", "swa", "ttt_e2e")


class PonderConfig(PretrainedConfig):
    model_type = "ponder"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 384,
        mode: str = "full",
        sliding_window: int = 128,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        qk_norm: bool = True,
        pre_norm: bool = True,
        post_norm: bool = True,
        max_position_embeddings: int = 8192,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        if mode not in MODES:
            raise ValueError(f"PonderConfig.mode={mode!r}: must be one of {MODES}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.mode = mode
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.qk_norm = qk_norm
        self.pre_norm = pre_norm
        self.post_norm = post_norm
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_window(self) -> int | None:
        """Keys a query sees (None: all earlier ones)."""
        return None if self.mode == "full" else self.sliding_window
