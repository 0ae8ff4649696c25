"""Checks a pipeline runs before it starts Ray or trains anything: each failure is a ConfigError
whose one line names the thing that is wrong and what would be right."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from training.checkpoint import check_model_dir
from training.config import ConfigError, DataConfig


def check_resume(cfg, run_dir: Path) -> bool:
    """What cfg.resume means for run_dir: True to continue it, False to start afresh."""
    exists = (run_dir / "config.yaml").is_file()
    if cfg.resume == "auto":
        return exists
    if cfg.resume and not exists:
        raise ConfigError(f"resume=true but there is no run at {run_dir} (no config.yaml); check out_dir and run_name, "
                          "or pass resume=auto to start one when there is none")
    return bool(cfg.resume)


def check_data_files(cfg: DataConfig) -> None:
    """The corpus files exist and parse: a malformed JSON line is named by file and line number."""
    if cfg.source == "embedded":
        return
    from training.data import DATA_FORMATS, _data_files

    try:
        files = _data_files(cfg.source)
    except FileNotFoundError:
        raise ConfigError(f"data.source={cfg.source}: no such file, directory or glob match; give json, jsonl, "
                          "parquet or text files") from None
    for f in files:
        kind = cfg.format if cfg.format != "auto" else DATA_FORMATS.get(Path(f).suffix.lower())
        if kind in ("json", "jsonl"):
            _check_json_file(Path(f))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            try:
                pq.ParquetFile(f)
            except Exception as e:
                raise ConfigError(f"data file {f} is not a readable parquet file ({e})") from None


def _check_json_file(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:  # one JSON document (a list of records) ...
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # ... or JSON lines, as datasets also reads .json files
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data file {path} line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                              "each line must be one JSON object") from None


def tokenizer_beside(base: Path) -> Path | None:
    """The tokenizer a pipeline saved with the model at `base` (<run>/model beside <run>/tokenizer)."""
    for candidate in (base, base.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def with_base_tokenizer(cfg, base: Path):
    """cfg with data.tokenizer set to the tokenizer saved with the base, when none is given and
    the base has one."""
    found = tokenizer_beside(base)
    if cfg.data.tokenizer or found is None:
        return cfg
    print(f"using the tokenizer saved with the base: {found}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(found)))


def check_base(base: Path) -> None:
    """`base` is a whole save_pretrained model directory that transformers can configure."""
    try:
        check_model_dir(base)
    except ValueError as e:
        raise ConfigError(f"base={base} is not a loadable model directory: {e}") from None
    import models  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base)
    except Exception as e:
        raise ConfigError(f"base={base}: transformers cannot read its config.json ({e})") from None


def check_ponder_base(base: Path) -> None:
    """`base` is a loadable Ponder model (pretraining continues Ponder models; others are converted first)."""
    check_base(base)
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(base).model_type
    if model_type != "ponder":
        raise ConfigError(f"base={base} is a {model_type} model, not a Ponder one: convert it first with "
                          f"pipelines/convert_hf.py source={base} out=<dir>, then give base=<dir>")


def check_tokenizer_fits(base: Path, tokenizer, think_tokens: bool = True) -> None:
    """Every id the tokenizer makes has a row in the model's embedding, and (think_tokens) RLP's
    special tokens exist."""
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(base).vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but base={base} has vocab_size={vocab_size}: "
                          "give data.tokenizer=<the tokenizer the base was trained with>")
    if not think_tokens:
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<think>", "</think>") if t not in vocab]
    if missing or tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path} lacks {missing or ['an eos token']}: RLP needs "
                          "<think>, </think> and an eos token (train one with training/tokenizer.py)")


def check_proxy_vocab(proxy: Path, base: Path, tokenizer_dir: str | Path | None) -> None:
    """RPT's proxy scores the policy's token ids: it must share the policy's vocabulary (its
    vocab_size, and the tokenizer saved beside it, when there is one, must be the policy's at
    `tokenizer_dir`, when that is known)."""
    try:
        check_model_dir(proxy)
    except ValueError as e:
        raise ConfigError(f"rpt.proxy={proxy} is not a loadable model directory: {e}") from None
    from transformers import AutoConfig, PreTrainedTokenizerFast

    proxy_size, base_size = AutoConfig.from_pretrained(proxy).vocab_size, AutoConfig.from_pretrained(base).vocab_size
    beside = tokenizer_beside(proxy)
    theirs = PreTrainedTokenizerFast.from_pretrained(beside) if beside is not None else None
    ours = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    if proxy_size != base_size or (theirs is not None and ours is not None and theirs.get_vocab() != ours.get_vocab()):
        proxy_tok = f"tokenizer {beside}, {len(theirs)} tokens" if theirs is not None else "no tokenizer beside it"
        base_tok = f"tokenizer {tokenizer_dir}, {len(ours)} tokens" if ours is not None else "its tokenizer not yet made"
        raise ConfigError(f"rpt.proxy={proxy} (vocab_size {proxy_size}, {proxy_tok}) does not share the vocabulary of "
                          f"base={base} (vocab_size {base_size}, {base_tok}): give a proxy trained with the policy's "
                          "tokenizer")
