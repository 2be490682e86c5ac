"""Long-only portfolio weights capped at 0.3, learned end to end (a deepdow-style layer).

A network maps each day's features to scores; the constrained softmax turns them into
weights that sum to one with none above 0.3 (``cx.functional.softmax(..., upper=0.3)``,
the KL projection of the softmax onto the capped simplex, exact and differentiable).
Training maximises the mean log return of the portfolio on made data where two of the
eight assets are much better: an unconstrained softmax would put nearly everything on
them; the cap spreads the weight (0.3 + 0.3 on the two, the rest over the others).

    python examples/portfolio_caps.py
"""

from __future__ import annotations

import torch

import convexmix as cx

N_ASSETS, CAP = 8, 0.3


def make_returns(days: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(days, 16, generator=g)
    drift = torch.tensor([0.004, 0.003, 0.0, 0.0, 0.0005, 0.0, -0.001, 0.0])
    returns = drift + 0.01 * torch.randn(days, N_ASSETS, generator=g)
    return features, returns


def main(verbose: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    features, returns = make_returns(512)
    net = torch.nn.Linear(16, N_ASSETS)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for step in range(150):
        weights = cx.functional.softmax(net(features), upper=CAP)  # (days, assets)
        growth = torch.log1p((weights * returns).sum(-1)).mean()
        opt.zero_grad()
        (-growth).backward()
        opt.step()
        if verbose and step % 50 == 0:
            print(f"step {step:3d}  mean log return {growth.item():.5f}")
    with torch.no_grad():
        weights = cx.functional.softmax(net(features), upper=CAP)
    mean = weights.mean(0)
    if verbose:
        print("max weight on any day:", f"{weights.max().item():.4f}")
        print("mean weights:", [round(v, 3) for v in mean.tolist()])
    return {"weights": weights, "mean": mean}


if __name__ == "__main__":
    main()
