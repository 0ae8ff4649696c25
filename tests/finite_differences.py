"""The meta-gradient check the TTT-E2E and continuum-memory tests share."""

import pytest
import torch


def assert_meta_gradient_matches_finite_differences(model, x, y, params: dict, draws: int = 3, eps: float = 1e-6,
                                                    seed: int = 2):
    """For `draws` random entries of every named parameter of a float64 model: the gradient of its
    training loss on (x, y) equals the central difference of that loss."""

    def loss():
        return model(x, targets=y).loss

    model.zero_grad()
    loss().backward()
    gen = torch.Generator().manual_seed(seed)
    for name, p in params.items():
        for _ in range(draws):
            idx = tuple(torch.randint(0, n, (1,), generator=gen).item() for n in p.shape)
            with torch.no_grad():
                orig = p[idx].item()
                p[idx] = orig + eps
                plus = loss().item()
                p[idx] = orig - eps
                minus = loss().item()
                p[idx] = orig
            fd = (plus - minus) / (2 * eps)
            assert p.grad[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, idx)
