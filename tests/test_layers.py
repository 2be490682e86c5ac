"""WeightedSum, LazyWeightedSum and ScalarMix against manual and AllenNLP references."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import convexmix as cx
from tests.conftest import MAP_NAMES, round_trips


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def double(module: nn.Module) -> nn.Module:
    return module.to(torch.float64)


# ------------------------------------------------------------------------ WeightedSum


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


# -------------------------------------------------------------------- LazyWeightedSum


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


# ------------------------------------------------------------------------ ScalarMix


def allennlp_scalar_mix(
    scalars: torch.Tensor,
    gamma: torch.Tensor,
    tensors: list[torch.Tensor],
    mask: torch.Tensor | None = None,
    do_layer_norm: bool = False,
) -> torch.Tensor:
    """AllenNLP's ScalarMix.forward, written out per layer as AllenNLP does."""
    normed = torch.softmax(scalars, dim=0)
    if not do_layer_norm:
        return gamma * sum(w * t for w, t in zip(normed, tensors, strict=True))
    assert mask is not None
    broadcast_mask = mask.unsqueeze(-1).to(tensors[0].dtype)
    num_elements_not_masked = mask.sum() * tensors[0].size(-1)
    pieces = []
    for w, t in zip(normed, tensors, strict=True):
        t_masked = t * broadcast_mask
        mean = torch.sum(t_masked) / num_elements_not_masked
        var = torch.sum(((t_masked - mean) * broadcast_mask) ** 2) / num_elements_not_masked
        pieces.append(w * ((t - mean) / torch.sqrt(var + 1e-12)))
    return gamma * sum(pieces)


def allennlp_state_dict(scalars: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    sd = {f"scalar_parameters.{i}": s.reshape(1) for i, s in enumerate(scalars)}
    sd["gamma"] = torch.tensor([gamma], dtype=torch.float64)
    return sd


@pytest.mark.parametrize("layer_norm", [False, True])
def test_scalar_mix_matches_allennlp(layer_norm: bool) -> None:
    scalars = rand(5, seed=1)
    layers = [rand(3, 7, 6, seed=10 + k) * (k + 1) + k for k in range(5)]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    # Built in float64: a float32 module cast with .double() keeps float32-rounded weights,
    # about 1e-8 relative, which is more than float64's comparison tolerance.
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mix = cx.ScalarMix.from_allennlp(allennlp_state_dict(scalars, 1.7), layer_norm=layer_norm)
    finally:
        torch.set_default_dtype(old_dtype)
    expected = allennlp_scalar_mix(
        scalars, torch.tensor(1.7, dtype=torch.float64), layers, mask, layer_norm
    )
    torch.testing.assert_close(mix(layers, mask=mask), expected)
    torch.testing.assert_close(mix(torch.stack(layers), mask=mask), expected)
    torch.testing.assert_close(mix(tuple(layers), mask=mask), expected)
    # gradients too
    xs = [t.clone().requires_grad_() for t in layers]
    ys = [t.clone().requires_grad_() for t in layers]
    g = rand(3, 7, 6, seed=99)
    (mix(xs, mask=mask) * g).sum().backward()
    (
        allennlp_scalar_mix(scalars, torch.tensor(1.7, dtype=torch.float64), ys, mask, layer_norm)
        * g
    ).sum().backward()
    for a, b in zip(xs, ys, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_scalar_mix_token_layer_norm() -> None:
    layers = [rand(2, 3, 8, seed=k) * 3 + k for k in range(4)]
    mix = double(cx.ScalarMix(4, layer_norm="token", init=[0.1, 0.2, 0.3, 0.4], gamma=2.0))
    normed = [nn.functional.layer_norm(t, (8,), eps=1e-12) for t in layers]
    expected = 2.0 * sum(w * t for w, t in zip([0.1, 0.2, 0.3, 0.4], normed, strict=True))
    torch.testing.assert_close(mix(layers), expected)


def test_from_allennlp_roundtrip_and_prefix() -> None:
    scalars = torch.tensor([0.3, -1.0, 2.0])
    sd = {f"encoder.mix.{k}": v for k, v in allennlp_state_dict(scalars, 0.5).items()}
    mix = cx.ScalarMix.from_allennlp(sd)
    torch.testing.assert_close(mix.weights, torch.softmax(scalars, 0))
    assert mix.gamma is not None
    assert mix.gamma.item() == 0.5
    with pytest.raises(cx.ConvexMixError, match="found 0 sets of scalar_parameters"):
        cx.ScalarMix.from_allennlp({"gamma": torch.ones(1)})


def test_scalar_mix_init_trainable_and_weights() -> None:
    mix = cx.ScalarMix(3, init=[0.2, 0.3, 0.5], trainable=False)
    torch.testing.assert_close(mix.weights, torch.tensor([0.2, 0.3, 0.5]))
    assert not any(p.requires_grad for p in mix.parameters())
    assert cx.ScalarMix(3, gamma=False).gamma is None
    with pytest.raises(cx.InvalidProbabilitiesError, match="not logits"):
        cx.ScalarMix(2, init=[1.0, -1.0])


def test_layer_dropout_only_in_training_and_never_all() -> None:
    torch.manual_seed(0)
    mix = cx.ScalarMix(4, layer_dropout=0.9, gamma=False)
    layers = [torch.full((2,), float(k + 1)) for k in range(4)]
    mix.eval()
    torch.testing.assert_close(mix(layers), torch.full((2,), 2.5))
    mix.train()
    seen = set()
    for _ in range(50):
        out = mix(layers)
        # one or more layers kept, renormalised: the output is a mean of kept layer values
        assert 1.0 <= out[0].item() <= 4.0
        seen.add(round(out[0].item(), 4))
    assert len(seen) > 1  # layers were dropped
    assert {1.0, 2.0, 3.0, 4.0} & seen  # single kept layers happen at p = 0.9


def test_scalar_mix_errors_and_roundtrip() -> None:
    mix = cx.ScalarMix(2, layer_norm=True)
    with pytest.raises(cx.ShapeError, match=r"expects 2 layers; got 3"):
        mix([torch.zeros(1, 2, 3)] * 3)
    with pytest.raises(
        cx.ShapeError, match=r"layer_norm=True needs .*mask of shape \(B, T\).*mask None"
    ):
        mix([torch.zeros(1, 2, 3)] * 2)
    with pytest.raises(cx.ConvexMixError, match="layer_norm must be False, True or 'token'"):
        cx.ScalarMix(2, layer_norm="layer")
    with pytest.raises(cx.ConvexMixError, match=r"layer_dropout must be in \[0, 1\)"):
        cx.ScalarMix(2, layer_dropout=1.0)
    assert repr(cx.ScalarMix(3, layer_norm="token")) == (
        "ScalarMix(\n  num_layers=3, gamma=True, layer_norm='token'\n"
        "  (mix): SimplexWeights(n=3, map='softmax', total=1.0)\n)"
    )
    clone = pickle.loads(pickle.dumps(cx.ScalarMix(3, init=[0.5, 0.25, 0.25])))
    torch.testing.assert_close(clone.weights, torch.tensor([0.5, 0.25, 0.25]))


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


def test_scalar_mix_state_dict_and_deepcopy() -> None:
    mix = cx.ScalarMix(3, init=[0.6, 0.3, 0.1], gamma=0.5, layer_norm="token")
    fresh = cx.ScalarMix(3, layer_norm="token")
    fresh.load_state_dict(mix.state_dict())
    layers = [torch.randn(2, 4, 5) for _ in range(3)]
    torch.testing.assert_close(fresh(layers), mix(layers))
    torch.testing.assert_close(copy.deepcopy(mix)(layers), mix(layers))
    assert sorted(mix.state_dict()) == ["gamma", "mix.free"]


# ------------------------------------------------------- issue 14: hardening regressions


@pytest.mark.parametrize("layer_norm", ["token", True])
def test_scalar_mix_layer_norm_keeps_precision(layer_norm: bool | str) -> None:
    """Issue 14.4: the folded normalisation cancelled (0.016 error at mean 1e3, std 1e-2)."""
    gen = torch.Generator().manual_seed(0)
    layers = [1e3 + 1e-2 * torch.randn(2, 5, 64, generator=gen) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mix = cx.ScalarMix(3, layer_norm=layer_norm, init=[0.2, 0.3, 0.5])
    out = mix(layers, mask)
    ref = copy.deepcopy(mix).double()([t.double() for t in layers], mask)
    # inputs of 1e3 carry ulp/2 = 3e-5 each; over std 1e-2 that is 3e-3 after normalising
    assert (out.double() - ref).abs().max() < 4e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer_norm", ["token", True])
def test_scalar_mix_constant_layers_give_zeros(layer_norm: bool | str, dtype: torch.dtype) -> None:
    """Issue 14.4: constant tokens gave 0.125 in float32 and NaN in float16."""
    mix = cx.ScalarMix(3, layer_norm=layer_norm, init=[0.2, 0.3, 0.5])
    layers = [torch.full((2, 5, 8), v, dtype=dtype) for v in (3.7, -1.1, 1000.1)]
    out = mix(layers, torch.ones(2, 5, dtype=torch.bool))
    assert out.dtype == dtype
    assert (out == 0).all()


def test_scalar_mix_all_false_mask_gives_zeros() -> None:
    """Issue 14.4: layer_norm=True with an all-False mask gave all NaN."""
    mix = cx.ScalarMix(2, layer_norm=True)
    layers = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    out = mix(layers, torch.zeros(2, 3, dtype=torch.bool))
    assert (out == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in layers)


@pytest.mark.parametrize("layer_norm", ["token", True])
def test_scalar_mix_layer_norm_gradcheck(layer_norm: bool | str) -> None:
    mix = cx.ScalarMix(3, layer_norm=layer_norm, init=[0.2, 0.3, 0.5], gamma=1.5).double()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    layers = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    params = [mix.mix.free, mix.gamma]
    assert torch.autograd.gradcheck(lambda *a: mix(list(a[:3]), mask), [*layers, *params])


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
