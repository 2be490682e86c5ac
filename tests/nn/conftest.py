"""Helpers shared by the layer tests."""

from __future__ import annotations

import torch
from torch import nn


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def double(module: nn.Module) -> nn.Module:
    return module.to(torch.float64)
