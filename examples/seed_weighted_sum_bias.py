"""(b) A weighted sum of batched inputs plus an unconstrained learnable bias.

``y = sum_k w_k * x_k + b``: the weights live on the simplex, the bias is free. This is
``cx.WeightedSum(n, bias=True)``; the sum goes through ``convex_combination``, with no
Python loop over K temporaries.

    python examples/seed_weighted_sum_bias.py
"""

from __future__ import annotations

import torch

import convexmix as cx


def main(steps: int = 400, seed: int = 0, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    true_w, true_b = torch.tensor([0.2, 0.5, 0.3]), 0.7
    model = cx.WeightedSum(3, bias=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        inputs = torch.randn(3, 32, 16)  # 3 inputs of a (32, 16) batch, stacked on dim 0
        target = torch.einsum("k,k...->...", true_w, inputs) + true_b
        opt.zero_grad()
        loss = (model(inputs) - target).pow(2).mean()
        loss.backward()
        opt.step()

    learned = model.weights.detach()
    if verbose:
        print(f"learned={learned.numpy().round(3)} true={true_w.numpy()}")
        print(f"bias={model.bias.item():.3f} (true {true_b})  sum={learned.sum().item():.6f}")
    return {"learned": learned, "true": true_w, "bias": model.bias.item(), "true_bias": true_b}


if __name__ == "__main__":
    main()
