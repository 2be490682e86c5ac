"""The guide's portfolio example (weights capped at 0.3) runs and keeps its cap."""

from __future__ import annotations

import torch

from tests.test_examples_cli import load_example


def test_portfolio_example_keeps_the_cap() -> None:
    out = load_example("portfolio_caps").main(verbose=False)
    w = out["weights"]
    assert float(w.max()) <= 0.3 + 1e-6
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
    # the two good assets are held at (or near) the cap on average; none is dropped
    assert float(out["mean"][:2].min()) > 0.2
    assert float(out["mean"].min()) > 0.0
