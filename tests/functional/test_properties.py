"""Invariants of every map, as hypothesis properties, in every floating dtype.

sum == total within a dtype bound, p >= 0, masked == 0, all-absent slices == 0, and
finite outputs and gradients for logits in [-1e4, 1e4] with -inf entries.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.functional.test_maps import MAPS

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    rows = draw(st.integers(1, 4))
    k = draw(st.integers(2, 12))
    finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    values = st.one_of(
        finite, finite, finite, st.just(-math.inf), st.sampled_from([0.0, 1e4, -1e4])
    )
    x = draw(hnp.arrays(np.float64, (rows, k), elements=values))
    mask = draw(hnp.arrays(np.bool_, (rows, k)))
    total = draw(st.sampled_from([1.0, 0.5, 3.0]))
    return x, mask, total


def sum_tolerance(dtype: torch.dtype, k: int, total: float) -> float:
    # each output is rounded once to dtype: |error| <= eps/2 * p per entry, plus the
    # float32 compute for half inputs.
    return total * (k * torch.finfo(dtype).eps + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MAPS))
@given(problem=problems())
def test_invariants(
    name: str, dtype: torch.dtype, problem: tuple[np.ndarray, np.ndarray, float]
) -> None:
    x_np, mask_np, total = problem
    f = MAPS[name]
    x = torch.tensor(x_np).to(dtype).requires_grad_()
    mask = torch.tensor(mask_np)
    out = f(x, mask=mask, total=total)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    assert (out[~mask] == 0).all()

    # What can carry weight: present in the mask and not sent to 0 by a -inf. For
    # stick-breaking (K-1 inputs x[:, :-1]), z_i = -inf zeroes output i; the last output,
    # the rest of the stick, is never zero for finite-or--inf inputs.
    finite = torch.isfinite(x.detach())
    if name == "stick_breaking":
        finite = torch.cat([finite[:, :-1], torch.ones_like(finite[:, -1:])], dim=1)
    present = mask & finite
    sums = out.double().sum(-1)
    has_any = present.any(-1)
    tol = sum_tolerance(dtype, x.shape[-1], total)
    assert ((sums[has_any] - total).abs() <= tol).all(), (sums, total)
    assert (sums[~has_any] == 0).all()

    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
