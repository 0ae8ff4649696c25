"""A user reward that fails the way a process does, for tests/test_worker_faults.py: RLP's
information gain, except when a file in the directory $PONDER_FAULTS says otherwise:
- `hang`: the first thought group to see it takes it away and sleeps for the seconds it holds;
- `exit`: the worker process exits at once, as a crash would.
"""

import os
import time
from pathlib import Path

from rewards import get_reward

INFO_GAIN = get_reward("rlp_info_gain")


def info_gain_unless_told(inp):
    faults = Path(os.environ["PONDER_FAULTS"])
    if (faults / "exit").exists():
        os._exit(1)
    try:
        seconds = float((faults / "hang").read_text())
        (faults / "hang").unlink()  # one worker takes it (the other's unlink fails)
    except (FileNotFoundError, ValueError):
        return INFO_GAIN(inp)
    time.sleep(seconds)
    return INFO_GAIN(inp)


info_gain_unless_told.needs = INFO_GAIN.needs
