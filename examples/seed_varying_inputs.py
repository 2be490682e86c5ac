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
source once, up front: ``cx.WeightedSum(n, sources=[...])`` takes a dict in which an
absent key is a missing input, and renormalises the weights over the present sources
(for softmax, the softmax over their logits). ``mask=`` does the same per sample, and a
sample with nothing present gives zeros, never NaN. (``cx.LazyWeightedSum`` infers n
from a first dry run, for when the count is fixed but not known in advance.)

    python examples/seed_varying_inputs.py
"""

from __future__ import annotations

import torch

import convexmix as cx

SOURCES = ["audio", "video", "text", "depth"]


def main(steps: int = 600, seed: int = 0, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    true = torch.tensor([0.4, 0.3, 0.2, 0.1])
    model = cx.WeightedSum(len(SOURCES), sources=SOURCES)  # exists before the optimizer
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

    learned = model.weights.detach()
    if verbose:
        print(f"learned={learned.numpy().round(3)} true={true.numpy()}")
        only = {"text": torch.ones(1), "depth": torch.zeros(1)}  # renormalised: 0.2 / (0.2 + 0.1)
        fused = model(only).item()
        print(f"sum={learned.sum().item():.6f}; text=1, depth=0, others absent -> {fused:.3f}")
    return {"learned": learned, "true": true}


if __name__ == "__main__":
    main()
