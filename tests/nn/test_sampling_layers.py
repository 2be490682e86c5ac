"""The sampling maps in the layers: map="gumbel" / "gumbel_soft" for SimplexWeights,
WeightedSum and Simplex (a sample per forward in training, deterministic in eval)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from scipy import stats

import convexmix as cx
from tests.conftest import round_trips


def test_training_draws_follow_the_init_probabilities():
    torch.manual_seed(0)
    p = torch.tensor([0.2, 0.3, 0.5])
    w = cx.SimplexWeights(3, map="gumbel", init=p)
    n = 4000
    draws = torch.stack([w().detach() for _ in range(n)])
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert (draws.sum(-1) == 1).all()
    counts = draws.sum(0).double().numpy()
    assert stats.chisquare(counts, (p.double() * n).numpy()).pvalue > 1e-3


def test_eval_is_deterministic():
    w = cx.SimplexWeights(3, map="gumbel", init=[0.2, 0.3, 0.5]).eval()
    assert torch.equal(w().detach(), torch.tensor([0.0, 0.0, 1.0]))
    soft = cx.SimplexWeights(3, map="gumbel_soft", init=[0.2, 0.3, 0.5]).eval()
    torch.testing.assert_close(soft().detach(), torch.tensor([0.2, 0.3, 0.5]))
    torch.manual_seed(1)
    soft.train()
    relaxed = soft().detach()
    assert not torch.allclose(relaxed, torch.tensor([0.2, 0.3, 0.5]))
    torch.testing.assert_close(relaxed.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("form", ["list", "dict", "stacked"])
def test_weighted_sum_picks_one_present_input(form):
    torch.manual_seed(2)
    fuse = cx.WeightedSum(4, map="gumbel", sources=["a", "b", "c", "d"])
    xs = [torch.full((2, 3), float(k + 1)) for k in range(4)]
    mask = torch.tensor([True, False, True, False])
    for _ in range(50):
        if form == "dict":
            out = fuse({"a": xs[0], "c": xs[2]})
        elif form == "list":
            out = fuse(xs, mask=mask)
        else:
            out = fuse(torch.stack(xs), mask=mask)
        assert out[0, 0].item() in (1.0, 3.0)
        assert (out == out[0, 0]).all()


def test_straight_through_gradient_reaches_the_free_values():
    torch.manual_seed(3)
    fuse = cx.WeightedSum(3, map="gumbel")
    xs = [torch.randn(5) for _ in range(3)]
    fuse(xs).sum().backward()
    assert fuse.free.grad is not None
    assert torch.isfinite(fuse.free.grad).all()
    assert fuse.free.grad.abs().sum() > 0


def test_the_guide_example_learns_to_select_the_informative_input():
    """The guide's example, run as written: the layer learns to pick the one input of six
    that predicts the target."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Hard selection: sampling maps") :]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert block is not None
    namespace: dict[str, object] = {}
    exec(compile(block[1], "docs/guide.md", "exec"), namespace)
    fuse = namespace["fuse"]
    assert isinstance(fuse, cx.WeightedSum)
    assert not fuse.training
    assert torch.equal(fuse.weights.detach(), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("name", ["gumbel", "gumbel_soft"])
def test_round_trips_keep_the_map_and_the_mode(name):
    w = cx.SimplexWeights(3, map=name, init=[0.1, 0.6, 0.3], temperature=0.7).eval()
    for copy in round_trips(w):
        assert copy.map == name
        assert not copy.training
        torch.testing.assert_close(copy(), w())
        copy.train()
        assert copy.simplex.training


def test_simplex_parametrization_follows_the_module_mode():
    layer = torch.nn.Linear(3, 2, bias=False)
    layer.weight = torch.nn.Parameter(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]))
    cx.simplex_(layer, "weight", map="gumbel")
    layer.eval()
    assert torch.equal(layer.weight.detach(), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    layer.train()
    torch.manual_seed(5)
    sample = layer.weight.detach()
    assert (sample.sum(-1) == 1).all()
    assert set(sample.unique().tolist()) <= {0.0, 1.0}


def test_jobs_refuse_sampling_maps():
    with pytest.raises(cx.UnknownMapError, match=r"draws samples; only SimplexWeights"):
        cx.ensemble.fit_weights(torch.rand(2, 10), torch.randint(0, 2, (10,)), map="gumbel")
    with pytest.raises(cx.ConvexMixError, match=r"upper= needs map='softmax'.*got map='gumbel'"):
        cx.SimplexWeights(3, map="gumbel", upper=0.5)


def test_learned_merge_refuses_sampling_maps():
    models = [torch.nn.Linear(2, 2) for _ in range(2)]
    with pytest.raises(cx.UnknownMapError, match=r"draws samples; only SimplexWeights"):
        cx.merge.LearnedMerge(models, map="gumbel")
