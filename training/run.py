"""What every pipeline does before its loop: parse the config, lay out the run directory, pick the
device, build the model."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from models import PonderConfig, PonderForCausalLM
from training.config import ConfigError, ModelConfig, TTTConfig, load_config, save_config
from training.checkpoint import StorageError, latest_checkpoint, save_model
from training.cluster import outputs_root, submitted_job
from training.preflight import check_resume, with_base_tokenizer
from training.run_lock import check_unlocked, lock


def parse_config_or_exit(schema: type, yaml_path: str | Path, argv: list[str]):
    """load_config, with a config mistake reported in one line and exit status 2."""
    with config_errors_exit():
        return load_config(schema, yaml_path, argv)


@contextmanager
def config_errors_exit():
    """A ConfigError raised inside (a config or start-up check) becomes one line and exit status 2."""
    try:
        yield
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def storage_errors_exit():
    """A StorageError (a full disk, a permission), raised here or inside a Ray actor (which wraps it),
    becomes one line and exit status 1."""
    try:
        yield
    except StorageError as e:
        print(f"error: {str(getattr(e, 'cause', None) or e).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(1) from None


def prepare_run_dir(cfg) -> Path:
    """<out_dir>/<run_name>, absolute and durable (see training/cluster.py), locked for this process
    (training/run_lock.py: a live run there is refused). Settles cfg.resume in place: auto becomes
    true when the run exists, true without a run is a ConfigError. A fresh start over an earlier run
    of the same name moves that run aside (to <run_name>.<time>)."""
    run_dir = outputs_root(cfg.out_dir) / cfg.run_name
    check_unlocked(run_dir)  # a live run there is neither moved aside nor resumed
    cfg.resume = check_resume(cfg, run_dir)
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), str(aside))
        print(f"an earlier run was at {run_dir}: moved to {aside} (pass resume=true to continue it instead)")
    if cfg.resume and latest_checkpoint(run_dir) is None:
        print(f"resume=true but {run_dir} holds no checkpoint yet: starting it from its beginning")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    except OSError as e:  # not writable, a file in the way, a read-only filesystem
        raise ConfigError(f"out_dir={cfg.out_dir}: cannot write {run_dir} ([Errno {e.errno}] {e.strerror}); give a "
                          "directory this user can write") from None
    print(f"outputs in {run_dir}" + (" (a submitted job: relative out_dir resolves under $PONDER_HOME, "
                                     "default ~/ponder)" if submitted_job() else ""))
    return run_dir


# What a run directory's entries hold, for the closing line.
OUTPUT_NOTES = {"model": "the trained model, from_pretrained", "base": "the base it pretrained",
                "base_model": "the given base, think tokens added", "warmup": "the format warm-up and its probe",
                "checkpoints": "for resume=true", "report": "the dashboard"}


def outputs_line(run_dir: Path) -> str:
    """Where a run's outputs went: the entries of its directory, the known ones explained."""
    entries = sorted(p for p in run_dir.iterdir() if not p.name.startswith("."))
    named = [p.name + ("/" if p.is_dir() else "") + (f" ({OUTPUT_NOTES[p.name]})" if p.name in OUTPUT_NOTES else "")
             for p in entries]
    return f"outputs in {run_dir}/: " + ", ".join(named)


def think_ready_base(cfg, base: Path, run_dir: Path):
    """(cfg, base) for a run whose policy thinks. data.tokenizer becomes the base's (given, or saved
    beside it); where that tokenizer lacks <think> and </think>, the base gets them
    (models/hf.add_think_tokens) and is saved with its tokenizer in <run_dir>/base_model, once per
    run (a resume and the report read that copy)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from models.hf import THINK_TOKENS, add_think_tokens

    cfg = with_base_tokenizer(cfg, base)
    if not cfg.data.tokenizer:  # none yet: the run trains one, with the think tokens
        return cfg, base
    prepared = run_dir / "base_model"
    if not (prepared / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.data.tokenizer)
        if all(t in tokenizer.get_vocab() for t in THINK_TOKENS):
            return cfg, base
        model = AutoModelForCausalLM.from_pretrained(base)
        probe = torch.tensor([tokenizer("Ponder thinks before it speaks: 12 + 30 = 42.")["input_ids"]])
        with torch.no_grad():
            before = model(probe).logits
            ids = add_think_tokens(model, tokenizer)
            change = float((model(probe).logits[..., : before.shape[-1]] - before).abs().max())
        save_model(model, prepared)
        tokenizer.save_pretrained(prepared)  # last: its presence marks the copy complete
        print(f"{base}: its tokenizer lacked {', '.join(THINK_TOKENS)}; added as ids {ids}, their embedding rows the mean "
              f"of the others; old tokens' logits changed by at most {change:.1e}; the prepared base is {prepared}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(prepared))), prepared


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def build_model(cfg: ModelConfig, tokenizer, ttt: TTTConfig | None = None) -> PonderForCausalLM:
    """A freshly initialised model with the tokenizer's vocabulary and special ids."""
    return PonderForCausalLM(model_config(cfg, tokenizer, ttt))


def ttt_fields(ttt: TTTConfig) -> dict:
    """The run's inner-loop settings (ttt.*) as the PonderConfig fields they set."""
    return {"ttt_grad": ttt.grad, "ttt_inner_lr": ttt.inner_lr, "ttt_clip": ttt.clip, "ttt_recompute": ttt.recompute,
            "ttt_update_during_decode": ttt.update_during_decode, "loss_average": ttt.loss_average}


def model_config(cfg: ModelConfig, tokenizer, ttt: TTTConfig | None = None) -> PonderConfig:
    """The PonderConfig of the model `build_model` makes."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name"}
    fields.update(ttt_fields(ttt or TTTConfig()))
    fields["vocab_size"] = fields["vocab_size"] or len(tokenizer)
    if fields["vocab_size"] < len(tokenizer):
        raise ConfigError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    return PonderConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **fields)


def check_vllm_serves(base: Path | None, cfg: ModelConfig, tokenizer, ttt: TTTConfig) -> None:
    """rollout.engine=vllm: a ConfigError naming the reason when vLLM cannot serve the base, or
    (no base given) the model the run would pretrain."""
    from rollout.vllm_engine import check_servable, servable_overrides

    try:
        if base is not None:
            check_servable(base)
        else:
            servable_overrides(model_config(cfg, tokenizer, ttt), f"the model to pretrain (model={cfg.name})")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def export_llama(run_dir: Path, tokenizer_dir: Path) -> Path:
    """A plain Ponder pretraining run (model.mode=full, pre-norm only) exported as a
    LlamaForCausalLM with its tokenizer, into <run>/llama: what pipelines/convert_hf.py reads."""
    from models.convert import to_llama

    llama = run_dir / "llama"
    save_model(to_llama(PonderForCausalLM.from_pretrained(run_dir / "model")), llama)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, llama / f.name)
    return llama


def load_base(path: str | Path, ttt: TTTConfig):
    """A saved model to train on from its weights: a Ponder model with the run's inner-loop
    settings applied, or any other Hugging Face causal LM as it is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if AutoConfig.from_pretrained(path).model_type != "ponder":
        return AutoModelForCausalLM.from_pretrained(path)
    model = PonderForCausalLM.from_pretrained(path)
    c = model.config
    for name, value in ttt_fields(ttt).items():
        setattr(c, name, value)
    c.loss_average = ttt.loss_average or ("chunk" if c.is_ttt else "token")  # unset: the mode's own
    model.inner_lr = ttt.inner_lr
    return model
