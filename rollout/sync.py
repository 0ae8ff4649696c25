"""Where an actor's weights live and how they travel from the learner to the engines.

    ray_device()    the GPU Ray assigned this actor (CUDA_VISIBLE_DEVICES holds only those), else the CPU
"""

from __future__ import annotations

import torch


def ray_device() -> torch.device:
    """The device of the Ray actor this runs in: its first assigned GPU, else the CPU."""
    import ray

    return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
