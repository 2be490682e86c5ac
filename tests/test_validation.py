"""The one validation layer: wrong types, the on-simplex tolerance, initial probabilities."""

from __future__ import annotations

import pytest
import torch

import convexmix as cx
from convexmix._validation import check_int, check_probabilities, is_on_simplex


@pytest.mark.parametrize(
    "call",
    [
        lambda: cx.SimplexWeights(2.0),  # type: ignore[arg-type]
        lambda: cx.SimplexWeights(True),  # type: ignore[arg-type]
        lambda: cx.functional.softmax([1.0, 2.0]),  # type: ignore[arg-type]
        lambda: cx.functional.softmax(torch.zeros(3), dim=0.5),  # type: ignore[arg-type]
        lambda: cx.functional.entmax(torch.zeros(3), 1.5, n_iter=2.0),  # type: ignore[arg-type]
        lambda: cx.Simplex(upper="0.5"),  # type: ignore[arg-type]
    ],
)
def test_wrong_types_raise_a_type_error_that_is_also_a_convexmix_error(call: object) -> None:
    with pytest.raises(cx.ConvexMixTypeError) as info:
        call()  # type: ignore[operator]
    assert isinstance(info.value, cx.ConvexMixError)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TypeError)


def test_a_wrong_value_of_the_right_type_is_not_a_type_error() -> None:
    with pytest.raises(cx.ConvexMixError, match=r"n must be an int >= 1; got 0") as info:
        cx.SimplexWeights(0)
    assert not isinstance(info.value, TypeError)
    with pytest.raises(cx.ConvexMixTypeError, match=r"k must be an int >= 2; got 1.5"):
        check_int(1.5, "k", 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_is_on_simplex_follows_the_dtype(dtype: torch.dtype) -> None:
    k = 1000
    p = torch.full((k,), 1.0 / k, dtype=torch.float64).to(dtype)  # each entry rounded
    assert is_on_simplex(p, 0, 1.0)
    assert is_on_simplex(p * 3, 0, 3.0)
    assert not is_on_simplex(p * 1.1, 0, 1.0)
    q = torch.zeros(k, dtype=dtype)
    q[0], q[1] = 1.5, -0.5
    assert not is_on_simplex(q, 0, 1.0)
    assert not is_on_simplex(torch.tensor([float("nan"), 1.0], dtype=dtype), 0, 1.0)


def test_initial_probabilities_one_validator() -> None:
    ok = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    assert check_probabilities(ok) is ok
    with pytest.raises(cx.InvalidProbabilitiesError, match=r"must sum to 1.0; got sum 1.5"):
        check_probabilities(torch.tensor([[0.25, 0.75], [0.5, 1.0]], dtype=torch.float64))
    with pytest.raises(cx.InvalidProbabilitiesError, match="not logits"):
        check_probabilities(torch.tensor([1.5, -0.5], dtype=torch.float64))
    with pytest.raises(cx.InvalidProbabilitiesError, match="finite"):
        check_probabilities(torch.tensor([float("nan"), 1.0], dtype=torch.float64))
    # float32 probabilities (a softmax output) are accepted to float32 rounding
    p32 = torch.softmax(torch.randn(5000, generator=torch.Generator().manual_seed(0)), 0)
    check_probabilities(p32.double(), dtype=torch.float32)
    # a NaN start of a merge is now refused, as the layers refuse it
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with pytest.raises(cx.InvalidProbabilitiesError, match="finite"):
        cx.merge.LearnedMerge([a, b], init=[float("nan"), 1.0])
