"""(a) Learnable weights that sum to one: recover known mixing weights.

The signal is a convex mixture of K sources; we learn the mixture with
``cx.SimplexWeights``, whose ``init`` takes probabilities (never logits) and whose
output is always on the simplex, so there is nothing to clamp or renormalise.

    python examples/seed_learnable_weights.py
"""

from __future__ import annotations

import torch

import convexmix as cx


def main(steps: int = 500, seed: int = 0, map: str = "softmax", verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    true = torch.tensor([0.6, 0.3, 0.1, 0.0])
    sources = torch.randn(4, 2048)  # K = 4 sources, 2048 samples each
    signal = true @ sources + 0.01 * torch.randn(2048)

    weights = cx.SimplexWeights(4, map=map)  # starts at exactly 1/4 each
    opt = torch.optim.Adam(weights.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = (weights() @ sources - signal).pow(2).mean()
        loss.backward()
        opt.step()

    learned = weights().detach()
    if verbose:
        print(f"map={map}  learned={learned.numpy().round(3)}  true={true.numpy()}")
        print(f"sum={learned.sum().item():.6f}  loss={loss.item():.2e}")
    return {"learned": learned, "true": true, "loss": loss.item()}


if __name__ == "__main__":
    main()
