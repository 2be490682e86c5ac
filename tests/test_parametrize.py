"""cx.Simplex with torch's parametrize, and cx.simplex_ / cx.remove_simplex_."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import convexmix as cx
from tests.conftest import MAP_NAMES, round_trips
from tests.reference import projection_bruteforce


def probs(*shape: int, seed: int = 0, zeros: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(*shape, generator=gen) + 0.05
    if zeros:
        p[..., 0] = 0.0
    return p / p.sum(-1, keepdim=True)


# -------------------------------------------------------------------------- Simplex


@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("zeros", [False, True])
def test_right_inverse_reproduces_probabilities(name: str, zeros: bool) -> None:
    s = cx.Simplex(name)
    p = probs(3, 5, zeros=zeros)
    torch.testing.assert_close(s(s.right_inverse(p)), p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", MAP_NAMES)
def test_right_inverse_with_dim_total_and_temperature(name: str) -> None:
    s = cx.Simplex(name, dim=0, total=2.0, temperature=0.5)
    p = 2.0 * probs(4, 3, seed=1).T
    free = s.right_inverse(p)
    assert free.shape == s.free_shape(p.shape)
    torch.testing.assert_close(s(free), p, atol=1e-6, rtol=1e-5)


def test_sparse_inverses_are_exact_on_the_simplex() -> None:
    p = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    for name in ["sparsemax", "entmax15"]:
        s = cx.Simplex(name)
        torch.testing.assert_close(s(s.right_inverse(p)), p, atol=1e-15, rtol=0)
    torch.testing.assert_close(cx.Simplex("sparsemax").right_inverse(p), p)


def test_softmax_inverse_zero_smoothing_is_documented_eps() -> None:
    s = cx.Simplex("softmax")
    out = s(s.right_inverse(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)))
    assert 0 < out[2] <= cx.functional.SOFTMAX_ZERO_EPS * 1.01


def test_register_parametrization_on_random_linear_starts_at_projection() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    w0 = layer.weight.detach().clone().double()
    with pytest.warns(cx.ConvexMixWarning, match=r"not on the simplex.*Euclidean projection"):
        parametrize.register_parametrization(layer, "weight", cx.Simplex("sparsemax"))
    expected = torch.stack([torch.tensor(projection_bruteforce(r.numpy())) for r in w0])
    torch.testing.assert_close(layer.weight.double(), expected, atol=1e-6, rtol=0)
    # Assigning probabilities afterwards reproduces them.
    p = probs(3, 6, seed=2)
    layer.weight = p
    torch.testing.assert_close(layer.weight, p)
    # It trains and stays on the simplex.
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    torch.testing.assert_close(layer.weight.sum(-1), torch.ones(3))
    assert (layer.weight >= 0).all()


@pytest.mark.parametrize("name", MAP_NAMES)
def test_register_parametrization_each_map(name: str) -> None:
    layer = nn.Linear(5, 2)
    with pytest.warns(cx.ConvexMixWarning):
        parametrize.register_parametrization(layer, "weight", cx.Simplex(name))
    torch.testing.assert_close(layer.weight.sum(-1), torch.ones(2))
    p = probs(2, 5, seed=3)
    layer.weight = p
    torch.testing.assert_close(layer.weight, p, atol=1e-6, rtol=1e-5)


def test_on_simplex_value_gives_no_warning() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(probs(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parametrize.register_parametrization(layer, "weight", cx.Simplex())


def test_simplex_repr_and_errors() -> None:
    assert repr(cx.Simplex("entmax15", dim=0, total=2.0, temperature=0.5)) == (
        "Simplex(map='entmax15', dim=0, total=2.0, temperature=0.5)"
    )
    with pytest.raises(
        cx.UnknownMapError, match=r"map must be one of \[.*'softmax'.*\]; got 'soft'"
    ):
        cx.Simplex("soft")
    with pytest.raises(cx.ConvexMixError, match=r"total must be finite and > 0; got 0.0"):
        cx.Simplex(total=0.0)
    with pytest.raises(cx.ConvexMixError, match=r"NaN or inf"):
        cx.Simplex().right_inverse(torch.tensor([0.5, float("nan")]))


# ------------------------------------------------------------------------- simplex_


def constrained_linear(map: str = "softmax") -> nn.Linear:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(probs(3, 4, seed=4))
    cx.simplex_(layer, "weight", map=map)
    return layer


@pytest.mark.parametrize("name", MAP_NAMES)
def test_simplex_keeps_current_value(name: str) -> None:
    layer = nn.Linear(4, 3)
    p = probs(3, 4, seed=4)
    with torch.no_grad():
        layer.weight.copy_(p)
    cx.simplex_(layer, "weight", map=name)
    torch.testing.assert_close(layer.weight, p, atol=1e-6, rtol=1e-5)
    assert isinstance(layer, nn.Linear)
    assert "weight_free" in dict(layer.named_parameters())
    assert "weight" not in dict(layer.named_parameters())


def test_simplex_projects_off_simplex_value_with_warning() -> None:
    layer = nn.Linear(5, 2)
    w0 = layer.weight.detach().clone().double()
    with pytest.warns(cx.ConvexMixWarning, match=r"shape \(2, 5\) is not on the simplex"):
        cx.simplex_(layer, "weight", map="sparsemax", total=2.0)
    expected = torch.stack([torch.tensor(projection_bruteforce(r.numpy(), 2.0)) for r in w0])
    torch.testing.assert_close(layer.weight.double(), expected, atol=1e-6, rtol=0)


def test_simplex_along_dim0_with_total() -> None:
    layer = nn.Linear(3, 4, bias=False)
    p = 3.0 * probs(3, 4, seed=5).T  # columns sum to 3
    with torch.no_grad():
        layer.weight.copy_(p)
    cx.simplex_(layer, "weight", dim=0, total=3.0, map="stick_breaking")
    torch.testing.assert_close(layer.weight, p, atol=1e-5, rtol=1e-5)
    assert layer.weight_free.shape == (3, 3)


def test_roundtrips_pickle_save_deepcopy_state_dict() -> None:
    layer = constrained_linear()
    x = torch.randn(2, 4)
    expected = layer(x)

    for clone in round_trips(layer):
        assert type(clone) is type(layer)
        torch.testing.assert_close(clone(x), expected)
        clone.weight = probs(3, 4, seed=6)  # the property still works on the copy
        torch.testing.assert_close(clone.weight, probs(3, 4, seed=6))
    torch.testing.assert_close(layer(x), expected)  # copies do not share state
    assert copy.deepcopy(layer).weight_free is not layer.weight_free

    fresh = constrained_linear()
    with torch.no_grad():
        fresh.weight_free.zero_()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), expected)


def test_whole_model_save_and_optimizer_step() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.warns(cx.ConvexMixWarning):
        cx.simplex_(model[2], "weight")
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
    torch.testing.assert_close(model[2].weight.sum(), torch.tensor(1.0))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(5, 4)
    torch.testing.assert_close(again(x), model(x))


def test_plain_state_dict_loads_into_constrained_module() -> None:
    plain = nn.Linear(4, 3)
    with torch.no_grad():
        plain.weight.copy_(probs(3, 4, seed=7))
    layer = constrained_linear()
    layer.load_state_dict(plain.state_dict())
    torch.testing.assert_close(layer.weight, plain.weight, atol=1e-6, rtol=1e-5)


def test_assignment_and_shape_error() -> None:
    layer = constrained_linear("sparsemax")
    p = probs(3, 4, seed=8, zeros=True)
    layer.weight = p
    torch.testing.assert_close(layer.weight, p)
    with pytest.raises(cx.ShapeError, match=r"cannot assign a value of shape \(2, 4\) to weight"):
        layer.weight = probs(2, 4)


def test_compile_fullgraph_constrained_module() -> None:
    layer = constrained_linear()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), layer(x))


def test_two_parameters_and_remove() -> None:
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(probs(3, 3, seed=9))
        layer.bias.copy_(probs(3, seed=10))
    cx.simplex_(layer, "weight", map="sparsemax")
    cx.simplex_(layer, "bias", map="softmax", dim=0)
    assert "weight: Simplex(map='sparsemax'" in repr(layer)
    assert "bias: Simplex(map='softmax'" in repr(layer)
    clone = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(clone.bias, layer.bias)

    current = layer.weight.detach().clone()
    cx.remove_simplex_(layer, "weight")
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight, current)
    assert "bias_free" in dict(layer.named_parameters())
    cx.remove_simplex_(layer, "bias")
    assert type(layer) is nn.Linear
    assert sorted(dict(layer.named_parameters())) == ["bias", "weight"]


def test_simplex_errors_leave_module_untouched() -> None:
    layer = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(
        cx.ConvexMixError,
        match=r"Linear has no parameter 'weights'; its parameters are \['weight', 'bias'\]",
    ):
        cx.simplex_(layer, "weights")
    with pytest.raises(cx.ShapeError, match=r"dim=2 is out of range for parameter 'weight'"):
        cx.simplex_(layer, "weight", dim=2)
    with pytest.raises(cx.UnknownMapError, match=r"got 'nope'"):
        cx.simplex_(layer, "weight", map="nope")
    assert type(layer) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with pytest.raises(cx.ConvexMixError, match=r"must be a torch.nn.Module; got Tensor"):
        cx.simplex_(torch.zeros(2), "weight")  # type: ignore[arg-type]
    with pytest.warns(cx.ConvexMixWarning):
        cx.simplex_(layer, "weight")
    with pytest.raises(cx.ConvexMixError, match=r"already constrained"):
        cx.simplex_(layer, "weight")
    with pytest.raises(
        cx.ConvexMixError, match=r"bias is not constrained.*constrained: \['weight'\]"
    ):
        cx.remove_simplex_(layer, "bias")
