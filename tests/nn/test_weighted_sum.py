"""WeightedSum and LazyWeightedSum against manual references."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from tests.conftest import MAP_NAMES, round_trips
from tests.nn.conftest import double, rand


@pytest.mark.parametrize("name", MAP_NAMES)
def test_weighted_sum_equals_manual_sum_for_every_input_form(name: str) -> None:
    layer = double(cx.WeightedSum(3, map=name, init=[0.5, 0.3, 0.2], sources=["a", "b", "c"]))
    xs = [rand(4, 5, seed=i) for i in range(3)]
    w = layer.weights
    expected = w[0] * xs[0] + w[1] * xs[1] + w[2] * xs[2]
    torch.testing.assert_close(
        w, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=1e-6, rtol=0
    )
    for form in (xs, tuple(xs), torch.stack(xs), dict(zip("abc", xs, strict=True))):
        torch.testing.assert_close(layer(form), expected)


def test_mask_renormalises_like_a_softmax_over_present_logits() -> None:
    layer = double(cx.WeightedSum(4, init=[0.1, 0.2, 0.3, 0.4]))
    xs = [rand(3, 6, seed=i) for i in range(4)]
    mask = torch.tensor([[True, False, True, True], [False, True, False, False], [True] * 4])
    out = layer(xs, mask=mask)
    logits = layer.free.detach()
    for b in range(3):
        present = mask[b].nonzero().flatten()
        w = torch.softmax(logits[present], 0)
        manual = sum(w[j] * xs[int(i)][b] for j, i in enumerate(present))
        torch.testing.assert_close(out[b], manual)
    # A (n,) mask is the same for every sample.
    vec = torch.tensor([True, False, False, True])
    torch.testing.assert_close(layer(xs, mask=vec), layer(xs, mask=vec.expand(3, 4)))


def test_fully_missing_sample_gives_bias_and_finite_grads() -> None:
    layer = double(cx.WeightedSum(3, bias=True))
    with torch.no_grad():
        layer.bias.fill_(0.25)
    xs = [rand(2, 4, seed=i).requires_grad_() for i in range(3)]
    mask = torch.tensor([[False, False, False], [True, True, False]])
    out = layer(xs, mask=mask)
    torch.testing.assert_close(out[0], torch.full((4,), 0.25, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(layer.free.grad).all()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    assert (xs[2].grad == 0).all()
    assert (xs[0].grad[0] == 0).all()


def test_dict_with_absent_keys_equals_mask() -> None:
    layer = double(cx.WeightedSum(3, sources=["rgb", "depth", "audio"], init=[0.2, 0.5, 0.3]))
    xs = {"rgb": rand(2, 3, seed=1), "audio": rand(2, 3, seed=2)}
    full = [xs["rgb"], torch.zeros(2, 3, dtype=torch.float64), xs["audio"]]
    expected = layer(full, mask=torch.tensor([True, False, True]))
    torch.testing.assert_close(layer(xs), expected)
    # absent keys and a per-sample mask combine
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = layer(xs, mask=mask)
    torch.testing.assert_close(out[0], xs["rgb"][0])
    torch.testing.assert_close(out[1], expected[1])


def test_per_channel_weights_against_manual_sum() -> None:
    layer = double(cx.WeightedSum(3, channels=4, bias=True, init="random"))
    assert layer.weights.shape == (3, 4)
    assert layer.bias.shape == (4,)
    torch.testing.assert_close(layer.weights.sum(0), torch.ones(4, dtype=torch.float64))
    xs = [rand(2, 5, 4, seed=i) for i in range(3)]
    w = layer.weights
    manual = sum(w[k] * xs[k] for k in range(3)) + layer.bias
    torch.testing.assert_close(layer(xs), manual)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = layer(xs, mask=mask)
    w0 = torch.softmax(layer.free[[0, 2]], 0)
    torch.testing.assert_close(out[0], w0[0] * xs[0][0] + w0[1] * xs[2][0] + layer.bias)
    torch.testing.assert_close(out[1], xs[1][1] + layer.bias)


def test_per_channel_init_probabilities() -> None:
    p = torch.tensor([[0.5, 0.1], [0.5, 0.9]])
    layer = cx.WeightedSum(2, channels=2, init=p)
    torch.testing.assert_close(layer.weights, p)
    with pytest.raises(cx.ShapeError, match=r"init must have shape \(2,\) or \(2, 2\)"):
        cx.WeightedSum(2, channels=2, init=torch.ones(3, 2) / 3)


@pytest.mark.parametrize("name", MAP_NAMES)
def test_weighted_sum_learns_fusion_weights(name: str) -> None:
    torch.manual_seed(0)
    true = torch.tensor([0.6, 0.4, 0.0])
    layer = cx.WeightedSum(3, map=name, bias=True)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(300):
        xs = torch.randn(3, 32, 8)
        target = torch.einsum("k,k...->...", true, xs) + 0.5
        opt.zero_grad()
        (layer(xs) - target).square().mean().backward()
        opt.step()
    torch.testing.assert_close(layer.weights.detach(), true, atol=0.03, rtol=0)
    assert abs(layer.bias.item() - 0.5) < 0.01


def test_weighted_sum_errors() -> None:
    layer = cx.WeightedSum(3, sources=["a", "b", "c"])
    xs = [torch.randn(2, 4) for _ in range(3)]
    with pytest.raises(cx.ShapeError, match=r"expects 3 inputs; got 2.*sources=\[\.\.\.\].*mask="):
        layer(xs[:2])
    with pytest.raises(
        cx.ConvexMixError, match=r"unknown source 'd'; the known sources are \['a', 'b', 'c'\]"
    ):
        layer({"a": xs[0], "d": xs[1]})
    with pytest.raises(cx.ShapeError, match=r"same shape; got \[\(2, 4\), \(2, 4\), \(3, 4\)\]"):
        layer([xs[0], xs[1], torch.randn(3, 4)])
    with pytest.raises(
        cx.ShapeError, match=r"mask must have shape \(3,\) or \(2, 3\).*got \(2, 2\)"
    ):
        layer(xs, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(cx.ConvexMixError, match=r"mask must be a bool tensor.*torch.float32"):
        layer(xs, mask=torch.ones(3))
    with pytest.raises(cx.ShapeError, match="channels=5 needs inputs whose last dimension is 5"):
        cx.WeightedSum(3, channels=5)(xs)
    with pytest.raises(cx.ConvexMixError, match="dict inputs need the source names"):
        cx.WeightedSum(2)({"a": xs[0]})
    with pytest.raises(cx.ConvexMixError, match="no input is present"):
        layer({})
    with pytest.raises(cx.ShapeError, match="sources must name the n=2 inputs; got 3"):
        cx.WeightedSum(2, sources=["a", "b", "c"])
    with pytest.raises(cx.ConvexMixError, match="sources must be distinct strings"):
        cx.WeightedSum(2, sources=["a", "a"])
    with pytest.raises(cx.ConvexMixError, match="inputs must be a list or tuple"):
        layer("abc")  # type: ignore[arg-type]


def test_weighted_sum_roundtrips_and_repr() -> None:
    layer = cx.WeightedSum(3, channels=2, bias=True, sources=["a", "b", "c"], init="random")
    assert repr(layer) == (
        "WeightedSum(n=3, map='softmax', channels=2, sources=['a', 'b', 'c'], bias=True)"
    )
    xs = [torch.randn(4, 2) for _ in range(3)]
    for clone in round_trips(layer):
        torch.testing.assert_close(clone(xs), layer(xs))
    fresh = cx.WeightedSum(3, channels=2, bias=True, sources=["a", "b", "c"])
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(xs), layer(xs))
    assert sorted(layer.state_dict()) == ["bias", "free"]


def test_weighted_sum_compiles() -> None:
    layer = cx.WeightedSum(3, channels=4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xs = torch.randn(3, 2, 4)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    torch.testing.assert_close(compiled(xs, mask), layer(xs, mask))


def test_lazy_infers_n_then_trains() -> None:
    layer = cx.LazyWeightedSum(bias=True)
    assert layer.has_uninitialized_params()
    xs = [torch.randn(8, 3) for _ in range(4)]
    layer(xs)  # the dry run
    assert type(layer) is cx.WeightedSum
    assert layer.n == 4
    torch.testing.assert_close(layer.weights, torch.full((4,), 0.25))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer.free.detach().clone()
    opt.zero_grad()
    (layer(xs) - xs[0]).square().mean().backward()
    opt.step()
    assert not torch.equal(before, layer.free.detach())
    with pytest.raises(cx.ShapeError, match=r"expects 4 inputs; got 5.*sources=\[\.\.\.\]"):
        layer([*xs, xs[0]])


def test_lazy_with_dict_inputs_takes_sources_from_first_call() -> None:
    layer = cx.LazyWeightedSum(init="uniform")
    layer({"x": torch.ones(2), "y": torch.zeros(2)})
    assert layer.sources == ["x", "y"]
    out = layer({"y": torch.zeros(2)})  # x absent: all weight on y
    torch.testing.assert_close(out, torch.zeros(2))
    with pytest.raises(cx.ConvexMixError, match=r"unknown source 'z'"):
        layer({"z": torch.zeros(2)})


def test_lazy_with_init_probabilities_and_channels() -> None:
    layer = cx.LazyWeightedSum(init=[0.7, 0.3], channels=3)
    layer(torch.randn(2, 5, 3))
    torch.testing.assert_close(layer.weights, torch.tensor([[0.7] * 3, [0.3] * 3]))


@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("channels", [None, 3])
def test_masks_work_with_every_map(name: str, channels: int | None) -> None:
    layer = double(cx.WeightedSum(4, map=name, channels=channels, init="random"))
    xs = [rand(3, 2, 3, seed=k) for k in range(4)]
    mask = torch.tensor([[False, True, False, False], [True, True, True, True], [False] * 4])
    out = layer(xs, mask=mask)
    torch.testing.assert_close(out[0], xs[1][0])  # a single present input takes all the weight
    torch.testing.assert_close(out[1], layer(xs)[1])  # all present: the plain weights
    assert (out[2] == 0).all()


def test_lazy_weighted_sum_materialises_from_a_loaded_state() -> None:
    """Issue 14.7: load_state_dict left n at 0 ("expects 0 inputs; got 3")."""
    for kw in ({}, {"map": "stick_breaking"}, {"channels": 2}):
        src = cx.WeightedSum(3, **kw)  # type: ignore[arg-type]
        with torch.no_grad():
            src.free.normal_()
        lazy = cx.LazyWeightedSum(**kw)  # type: ignore[arg-type]
        lazy.load_state_dict(src.state_dict())
        xs = [torch.randn(4, 2) for _ in range(3)]
        torch.testing.assert_close(lazy(xs), src(xs))
        assert type(lazy) is cx.WeightedSum
    with pytest.raises(cx.ShapeError, match=r"expected \(n,\) for channels=None"):
        cx.LazyWeightedSum().load_state_dict(cx.WeightedSum(3, channels=2).state_dict())


def test_lazy_weighted_sum_stays_lazy_after_a_failed_first_call() -> None:
    """Issue 14.7: a failed first call fixed n and turned the module into a WeightedSum."""
    lazy = cx.LazyWeightedSum(channels=4)
    with pytest.raises(cx.ShapeError, match="channels=4 needs inputs whose last dimension"):
        lazy([torch.ones(2, 3)] * 3)
    assert type(lazy) is cx.LazyWeightedSum
    assert lazy.has_uninitialized_params()
    assert lazy([torch.ones(2, 4)] * 2).shape == (2, 4)
    assert lazy.n == 2


def test_weighted_sum_per_channel_init_needs_channels() -> None:
    """Issue 14.12: an (n, C) init without channels= was accepted, then failed at forward."""
    with pytest.raises(cx.ShapeError, match="pass channels=3"):
        cx.WeightedSum(2, init=torch.full((2, 3), 0.5))
