"""(c) A varying number of inputs, done right.

The usual version creates its weights inside ``forward`` once it sees how many inputs
arrived::

    class Dynamic(nn.Module):
        def forward(self, inputs):
            self.w = nn.Parameter(torch.zeros(len(inputs)))  # new, untrained, every call
            ...

    torch.optim.Adam(Dynamic().parameters())  # ValueError: optimizer got an empty parameter list

Parameters made in ``forward`` do not exist when the optimizer is built, and are
replaced on every call, so nothing ever trains. The right pattern declares every
source once, up front, and passes a mask of which ones are present in a batch: the
weights are renormalised over the present sources (for softmax, the softmax over
their logits), and a batch with none present gives zeros, never NaN.

    python examples/seed_varying_inputs.py
"""

from __future__ import annotations

import torch
from torch import nn

import convexmix as cx

SOURCES = ["audio", "video", "text", "depth"]


class MaskedFusion(nn.Module):
    def __init__(self, sources: list[str]) -> None:
        super().__init__()
        self.sources = list(sources)
        self.weights = cx.SimplexWeights(len(sources))  # exists before the optimizer

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        present = torch.tensor([name in inputs for name in self.sources])
        w = self.weights(mask=present)  # 0 for absent sources, the rest sum to 1
        like = next(iter(inputs.values()))
        stacked = torch.stack([inputs.get(n, torch.zeros_like(like)) for n in self.sources])
        return torch.einsum("k,k...->...", w, stacked)


def main(steps: int = 600, seed: int = 0, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    true = torch.tensor([0.4, 0.3, 0.2, 0.1])
    model = MaskedFusion(SOURCES)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        present = torch.rand(4) < 0.7
        present[torch.randint(4, ())] = True  # at least one source per batch
        inputs = {n: torch.randn(64) for n, p in zip(SOURCES, present.tolist(), strict=False) if p}
        # The target mixes the present sources with the true weights renormalised.
        w = true * present / (true * present).sum()
        target = sum(w[i] * inputs[n] for i, n in enumerate(SOURCES) if n in inputs)
        opt.zero_grad()
        loss = (model(inputs) - target).pow(2).mean()
        loss.backward()
        opt.step()

    learned = model.weights().detach()
    if verbose:
        print(f"learned={learned.numpy().round(3)} true={true.numpy()}")
        print(
            f"sum={learned.sum().item():.6f}; with only text and depth present:",
            model.weights(mask=torch.tensor([False, False, True, True])).detach().numpy().round(3),
        )
    return {"learned": learned, "true": true}


if __name__ == "__main__":
    main()
