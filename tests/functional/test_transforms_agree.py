"""Eager = vmap = compile, for every public map, on drawn hostile inputs, errors included.

Each case draws the values of a (3, 5) input (ordinary floats, ties, +-1e4, +-inf, NaN),
bounds for the maps that take them (caps and lower bounds per entry, with 0, +inf and
NaN among them, feasible or not) and a dtype. The map runs three ways:

* eager;
* under ``torch.func.vmap`` over the rows (each row a slice of its own);
* under ``torch.compile(fullgraph=True)`` (the ``aot_eager`` backend: Dynamo and
  AOTAutograd, where the maps' custom ops and checks live), one compiled function per
  map and dtype: its first call is the cold one (tracing included), the others warm.

The three must agree: the same values (NaN where eager has NaN, to a few ulps
elsewhere), or the same :class:`~convexmix.ConvexMixError` class with the same message up
to its first colon. The special-value contract itself is checked on eager calls by the
adversarial suites; agreement carries it to vmap and compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import convexmix as cx
from convexmix.errors import ConvexMixError
from tests.functional.test_adversarial import draw_values

F = cx.functional
inf, nan = math.inf, math.nan
SHAPE = (3, 5)
Map = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: name -> map(x, lower, upper) along the last dim; lower/upper are (5,) tensors
MAPS: dict[str, Map] = {
    "softmax": lambda x, lo, up: F.softmax(x, total=2.0),
    "softmax_upper": lambda x, lo, up: F.softmax(x, upper=up),
    "softmax_upper_t": lambda x, lo, up: F.softmax(x, temperature=0.01, upper=up),
    "sparsemax": lambda x, lo, up: F.sparsemax(x),
    "sparsemax_bounds": lambda x, lo, up: F.sparsemax(x, lower=lo, upper=up),
    "entmax15": lambda x, lo, up: F.entmax15(x, total=0.5),
    "entmax_bisect": lambda x, lo, up: F.entmax(x, 1.25),
    "stick_breaking": lambda x, lo, up: F.stick_breaking(x),
    "project_auto": lambda x, lo, up: F.project_simplex(x),
    "project_sort": lambda x, lo, up: F.project_simplex(x, method="sort"),
    "project_bisect": lambda x, lo, up: F.project_simplex(x, method="bisect"),
    "project_condat": lambda x, lo, up: F.project_simplex(x, method="condat"),
    "project_capped": lambda x, lo, up: F.project_simplex(x, total=1.5, lower=lo, upper=up),
    "project_sparse_simplex": lambda x, lo, up: F.project_sparse_simplex(x, 2),
    "project_l1_ball": lambda x, lo, up: F.project_l1_ball(x, radius=0.75),
}
DTYPES = [torch.float32, torch.float64]
UPPERS = [0.0, 0.125, 0.25, 0.5, 1.0, inf, nan]
LOWERS = [0.0, -0.5, 0.0625, 0.125, 0.25, 0.5]

_compiled: dict[tuple[str, torch.dtype], Any] = {}


def _pick(draw: st.DrawFn, palette: list[float]) -> torch.Tensor:
    idx = np.frombuffer(draw(st.binary(min_size=SHAPE[1], max_size=SHAPE[1])), np.uint8)
    # NaN (the palette's last value) one time in four draws
    n = len(palette) if idx[0] % 4 == 0 else len(palette) - 1
    return torch.tensor(np.array(palette)[idx % n])


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    x = draw_values(draw, math.prod(SHAPE)).reshape(SHAPE)
    return {
        "x": np.where(np.isfinite(x), np.clip(x, -1e4, 1e4), x),
        "dtype": draw(st.sampled_from(DTYPES)),
        "lower": _pick(draw, [*LOWERS, nan]),
        "upper": _pick(draw, UPPERS),
    }


def _outcome(call: Callable[[], torch.Tensor]) -> torch.Tensor | str:
    try:
        return call()
    except ConvexMixError as err:
        return f"{type(err).__name__}: {str(err).split(':')[0]}"


def _same(a: torch.Tensor | str, b: torch.Tensor | str, how: str) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b, f"eager gave {a if isinstance(a, str) else 'values'}, {how} gave {b}"
        return
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    eps = torch.finfo(a.dtype).eps
    torch.testing.assert_close(b, a, equal_nan=True, atol=16 * eps, rtol=16 * eps, msg=how)


def check(name: str, case: dict[str, Any]) -> None:
    fn = MAPS[name]
    dtype = case["dtype"]
    x = torch.tensor(case["x"]).to(dtype)
    lo, up = case["lower"].to(dtype), case["upper"].to(dtype)
    eager = _outcome(lambda: fn(x, lo, up))
    vmapped = _outcome(lambda: torch.func.vmap(fn, in_dims=(0, None, None))(x, lo, up))
    _same(eager, vmapped, "vmap")
    key = (name, dtype)
    cold = key not in _compiled
    if cold:
        _compiled[key] = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    compiled = _outcome(lambda: _compiled[key](x, lo, up))
    _same(eager, compiled, "compile (cold)" if cold else "compile (warm)")


@pytest.mark.parametrize("name", list(MAPS))
@given(data=st.data())
def test_eager_vmap_and_compile_agree(name: str, data: st.DataObject) -> None:
    check(name, data.draw(cases()))


@pytest.mark.parametrize("name", ["softmax_upper", "project_capped", "sparsemax_bounds"])
def test_the_same_infeasible_error_everywhere(name: str) -> None:
    x = torch.randn(SHAPE)
    lo, up = torch.zeros(5), torch.full((5,), 0.125)  # sum(upper) < total
    fn = MAPS[name]
    eager = _outcome(lambda: fn(x, lo, up))
    assert isinstance(eager, str)
    assert eager.startswith("ConvexMixError: infeasible bounds")
    fresh = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _same(eager, _outcome(lambda: fresh(x, lo, up)), "compile (cold)")
    _same(eager, _outcome(lambda: fresh(x, lo, up)), "compile (warm)")
    _same(eager, _outcome(lambda: torch.func.vmap(fn, (0, None, None))(x, lo, up)), "vmap")
