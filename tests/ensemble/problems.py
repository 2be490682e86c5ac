"""Synthetic ensemble problems whose optimum blends several models."""

from __future__ import annotations

import torch


def mixed_problem(
    K: int, N: int, C: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N, C) class probabilities of models of mixed quality, and (N,) labels.

    A softmax of a class signal plus independent noise: the noise is independent across
    models, so the optimum uses several of them.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    signal = torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    noise = torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 2 + 1
    P = torch.randn(K, N, C, generator=g, dtype=torch.float64).mul_(noise)
    P.view(K, N * C)[:, torch.arange(N) * C + y] += signal.view(K, 1)
    return torch.softmax(P, -1).to(dtype), y


def two_model_problem(N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two binary classifiers with independent errors: the optimum is inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (N,), generator=g)
    sign = y.double() * 2 - 1
    a = torch.sigmoid(1.2 * sign + 1.5 * torch.randn(N, generator=g, dtype=torch.float64))
    b = torch.sigmoid(1.0 * sign + 1.5 * torch.randn(N, generator=g, dtype=torch.float64))
    return torch.stack([a, b]), y
