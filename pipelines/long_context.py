"""Loss by position beyond the sliding window: full attention, SWA, TTT-E2E and continuum memory
(model.cms_chunk_sizes) trained on the same long documents and tokens, each evaluated out to
eval_windows_of_context sliding windows with and without state carried across windows.

    python pipelines/long_context.py                              # four small CPU runs
    python pipelines/long_context.py arms=[ttt_e2e,cms] cms_chunk_sizes=[16,64] reuse=true
    python pipelines/long_context.py arms=[ttt_e2e] ttt.carry_state=true ttt.carry_backprop_windows=2 \
        out_dir=runs/long_context_k2                              # trained through the carried state
    python pipelines/report.py runs/long_context                  # the long-context panel

Outputs in <out_dir>/: one run per arm (<arm>/), corpus/, tokenizer/ and long_context.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from training.config import CONFIG_DIR, LongContextConfig  # noqa: E402
from training.long_context import run_long_context  # noqa: E402
from training.run import config_errors_exit, parse_config_or_exit  # noqa: E402


def main(argv: list[str]) -> dict:
    cfg = parse_config_or_exit(LongContextConfig, CONFIG_DIR / "long_context.yaml", argv)
    torch.manual_seed(cfg.seed)
    with config_errors_exit():
        return run_long_context(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
