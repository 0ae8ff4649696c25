"""A pretrained Hugging Face transformer (LlamaForCausalLM, Qwen3ForCausalLM) as a TTT-E2E Ponder
model, ready for meta-learning from its weights (the bridge: ttt_pretrain.py base=<out>).

    python pipelines/convert_hf.py source=path/to/qwen3 out=runs/qwen3_ttt
    python pipelines/convert_hf.py source=... out=... model.suffix_len=2 model.sliding_window=128 model.mini_batch_size=32

Writes <out>/ (save_pretrained, mode ttt_e2e) with the source's tokenizer files copied beside the
weights (from the source's directory, or from the tokenizer/ a pipeline saved beside it). On sequences within the window the converted model computes the source's function
exactly (models/convert.py says how).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a Ray working_dir

from models.convert import convert_hf  # noqa: E402
from training.checkpoint import save_model  # noqa: E402
from training.config import CONFIG_DIR, ConfigError, ConvertConfig  # noqa: E402
from training.preflight import tokenizer_beside  # noqa: E402
from training.run import config_errors_exit, export_llama, parse_config_or_exit  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def main(argv: list[str]) -> Path:
    cfg = parse_config_or_exit(ConvertConfig, CONFIG_DIR / "convert_hf.yaml", argv)
    source, out = Path(cfg.source).expanduser(), Path(cfg.out).expanduser()
    with config_errors_exit():
        try:
            model = convert_hf(source, cfg.model.suffix_len, cfg.model.sliding_window, cfg.model.mini_batch_size)
        except ValueError as e:  # an unsupported source, or a suffix_len the source's depth does not allow
            raise ConfigError(str(e)) from None
    save_model(model, out)
    tokenizer = tokenizer_beside(source) or source  # in the model's directory, or a pipeline's tokenizer/ beside it
    copied = [name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    for name in copied:
        shutil.copy2(tokenizer / name, out / name)
    c = model.config
    print(f"converted {source} ({model.num_params() / 1e6:.2f}M parameters, {c.num_hidden_layers} blocks) to {out}: "
          f"fast MLPs in the last {c.suffix_len}, window {c.sliding_window}, chunks of {c.mini_batch_size}")
    if not copied:
        print(f"note: {source} holds no tokenizer files; give data.tokenizer=<its tokenizer> when training")
    return out


def convert_plain_run(run_dir: Path, tokenizer_dir: Path, model_overrides: list[str]) -> Path:
    """A plain Ponder pretraining run (model.mode=full, pre-norm only) exported as a
    LlamaForCausalLM with its tokenizer (<run>/llama) and converted (<run>/converted): the first half
    of a warm start on the embedded corpus. model_overrides: `model.suffix_len=...` and the like."""
    return main([f"source={export_llama(run_dir, tokenizer_dir)}", f"out={run_dir / 'converted'}", *model_overrides])


if __name__ == "__main__":
    main(sys.argv[1:])
