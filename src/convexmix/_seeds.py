"""The seed scenarios, trained for ``convexmix seeds`` (private; see examples/ for scripts).

Each scenario draws data from known weights, fits ``SimplexWeights`` and reports the
learned weights beside the true ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from convexmix.nn import SimplexWeights, WeightedSum

__all__: list[str] = []


@dataclass
class ScenarioResult:
    name: str
    map: str
    learned: Tensor
    true: Tensor
    loss: float
    extra: str = ""


def _fit(
    params: Iterator[nn.Parameter],
    loss_fn: Callable[[], Tensor],
    steps: int,
    progress: Callable[[int], None],
) -> float:
    opt = torch.optim.Adam(params, lr=0.05)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        progress(1)
    return float(loss.detach())


def mixing(map: str, steps: int, progress: Callable[[int], None]) -> ScenarioResult:
    """(a) recover the mixture of K = 5 sources behind a noisy signal."""
    true = torch.tensor([0.45, 0.3, 0.15, 0.1, 0.0])
    x = torch.randn(5, 4096)
    y = true @ x + 0.01 * torch.randn(4096)
    w = SimplexWeights(5, map=map)
    loss = _fit(w.parameters(), lambda: (w() @ x - y).square().mean(), steps, progress)
    return ScenarioResult("learnable weights", map, w().detach(), true, loss)


def with_bias(map: str, steps: int, progress: Callable[[int], None]) -> ScenarioResult:
    """(b) batched inputs (3, B, D): a WeightedSum with a free bias."""
    true, true_bias = torch.tensor([0.25, 0.6, 0.15]), -0.4
    layer = WeightedSum(3, map=map, bias=True)

    def loss_fn() -> Tensor:
        x = torch.randn(3, 64, 8)
        target = torch.tensordot(true, x, 1) + true_bias
        residual: Tensor = layer(x) - target
        return residual.square().mean()

    loss = _fit(layer.parameters(), loss_fn, steps, progress)
    bias = float(layer.bias.detach())
    return ScenarioResult(
        "weighted sum + bias",
        map,
        layer.weights.detach(),
        true,
        loss,
        f"bias {bias:+.3f} (true {true_bias:+.3f})",
    )


def varying(map: str, steps: int, progress: Callable[[int], None]) -> ScenarioResult:
    """(c) 4 named sources, declared up front; a random subset arrives in each batch."""
    names = ["audio", "video", "text", "depth"]
    true = torch.tensor([0.1, 0.2, 0.3, 0.4])
    layer = WeightedSum(4, map=map, sources=names)

    def loss_fn() -> Tensor:
        present = torch.rand(4) < 0.6
        present[int(torch.randint(4, ()))] = True
        x = torch.randn(4, 128)
        target_w = true * present / (true * present).sum()
        inputs = {n: x[i] for i, n in enumerate(names) if present[i]}  # absent keys: missing
        residual: Tensor = layer(inputs) - target_w @ x
        return residual.square().mean()

    loss = _fit(layer.parameters(), loss_fn, steps, progress)
    return ScenarioResult("varying inputs (named sources)", map, layer.weights.detach(), true, loss)


SCENARIOS = (mixing, with_bias, varying)
