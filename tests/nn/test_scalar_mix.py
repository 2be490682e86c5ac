"""ScalarMix against AllenNLP's reference."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import convexmix as cx
from tests.nn.conftest import double, rand


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


@pytest.mark.parametrize("seed", range(4))
def test_from_allennlp_float32_checkpoint_then_double_is_the_formula(seed: int) -> None:
    """A float32 checkpoint, then ``.double()``: the weights and the mix are AllenNLP's
    formula in float64 on the checkpoint's very float32 values, to float64 rounding (the
    logits are kept, not rebuilt from float32 probabilities: that was ~4e-8 off)."""
    gen = torch.Generator().manual_seed(seed)
    scalars = (torch.randn(7, generator=gen) * 3).float()
    gamma = torch.tensor([1.3], dtype=torch.float32)
    sd = {f"scalar_parameters.{i}": s.reshape(1) for i, s in enumerate(scalars)}
    sd["gamma"] = gamma
    mix = cx.ScalarMix.from_allennlp(sd).double()
    assert mix.mix.free.dtype == torch.float64
    assert torch.equal(mix.mix.free, scalars.double())  # the logits, exactly
    exact = torch.softmax(scalars.double(), 0)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(mix.weights, exact, rtol=4 * eps, atol=0.0)
    layers = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(7)]
    expected = allennlp_scalar_mix(scalars.double(), gamma.double().reshape(()), layers)
    scale = 1.3 * sum(w * t.abs() for w, t in zip(exact, layers, strict=True))
    assert ((mix(layers) - expected).abs() <= 16 * eps * scale).all()


def test_from_allennlp_rejects_init_and_bad_scalars() -> None:
    sd = allennlp_state_dict(torch.tensor([0.3, -1.0]), 0.5)
    with pytest.raises(cx.ConvexMixError, match="got init= as well"):
        cx.ScalarMix.from_allennlp(sd, init=[0.5, 0.5])
    sd["scalar_parameters.1"] = torch.tensor([float("nan")])
    with pytest.raises(cx.ConvexMixError, match="must be finite"):
        cx.ScalarMix.from_allennlp(sd)


def test_from_allennlp_with_temperature_keeps_the_weights() -> None:
    scalars = torch.tensor([0.3, -1.0, 2.0])
    mix = cx.ScalarMix.from_allennlp(allennlp_state_dict(scalars, 1.0), temperature=0.5)
    torch.testing.assert_close(mix.weights, torch.softmax(scalars, 0))


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


def test_scalar_mix_state_dict_and_deepcopy() -> None:
    mix = cx.ScalarMix(3, init=[0.6, 0.3, 0.1], gamma=0.5, layer_norm="token")
    fresh = cx.ScalarMix(3, layer_norm="token")
    fresh.load_state_dict(mix.state_dict())
    layers = [torch.randn(2, 4, 5) for _ in range(3)]
    torch.testing.assert_close(fresh(layers), mix(layers))
    torch.testing.assert_close(copy.deepcopy(mix)(layers), mix(layers))
    assert sorted(mix.state_dict()) == ["gamma", "mix.free"]


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
