"""The bounded convergence study's references: its optima agree across independent solvers.

``benchmarks/convergence_bounds.py`` measures every method against an exact optimum per
problem; these checks hold those optima to each other (a wrong reference would make the
study's gaps meaningless), and its recipe for a lost weight to what the docs say.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import convexmix as cx

pytest.importorskip("scipy")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study() -> Iterator[ModuleType]:
    before = torch.get_default_dtype()
    sys.path.insert(0, str(BENCH))
    try:
        path = BENCH / "convergence_bounds.py"
        spec = importlib.util.spec_from_file_location("convergence_bounds", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # sets float64 as the default dtype, as the study runs
        yield module
    finally:
        torch.set_default_dtype(before)
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def problems(study: ModuleType) -> dict[str, tuple[object, dict[str, object]]]:
    return {p.name[:3]: (p, o) for p, o in study.make_problems()}


def test_capped_log_loss_slsqp_agrees_with_fit_weights(study: ModuleType, problems: dict) -> None:
    problem, opts = problems["(f)"]
    full = lambda w: problem.loss(w, None)  # noqa: E731
    w_slsqp, val_slsqp = study.slsqp(full, problem.k, upper=study.CAP)
    fit = cx.ensemble.fit_weights(
        opts["probs"], opts["labels"], max_weight=study.CAP, validate=False
    )
    w_fit = torch.as_tensor(fit.weights, dtype=torch.float64)
    assert float(w_fit.max()) <= study.CAP + 1e-12
    assert abs(float(w_fit.sum()) - 1) < 1e-12
    assert abs(float(full(w_fit)) - val_slsqp) < 1e-10
    assert torch.allclose(w_fit, w_slsqp, atol=1e-6)
    assert float(w_fit.max()) == pytest.approx(study.CAP, abs=1e-9)  # the cap binds


def test_best_3_of_12_brute_force_agrees(study: ModuleType, problems: dict) -> None:
    problem, opts = problems["(g)"]
    full = lambda w: problem.loss(w, None)  # noqa: E731
    q, c = opts["ls"]
    w = study.active_set(q, c, k=3)
    assert int((w > 0).sum()) <= 3
    assert abs(float(w.sum()) - 1) < 1e-12
    best = float(full(w))
    # an independent brute force: SLSQP on every support of size 3
    vals = [
        study.slsqp(full, problem.k, support=s)[1]
        for s in itertools.combinations(range(problem.k), 3)
    ]
    assert len(vals) == math.comb(12, 3)
    assert min(vals) == pytest.approx(best, abs=1e-12)
    fit = cx.ensemble.fit_weights(opts["data"][0], opts["data"][1], loss="mse", max_models=3)
    assert float(full(torch.as_tensor(fit.weights, dtype=torch.float64))) == pytest.approx(
        best, abs=1e-12
    )


@pytest.mark.parametrize("name", ["(e)", "(h)"])
def test_capped_least_squares_active_set_is_the_optimum(
    study: ModuleType, problems: dict, name: str
) -> None:
    problem, opts = problems[name]
    full = lambda w: problem.loss(w, None)  # noqa: E731
    upper = float(opts.get("upper", 1.0))
    w = study.active_set(*opts["ls"], upper)
    _, val_slsqp = study.slsqp(full, problem.k, upper)
    assert float(full(w)) <= val_slsqp + 1e-14
    assert float(w.max()) <= upper + 1e-12
    assert abs(float(w.sum()) - 1) < 1e-12
    if name == "(e)":  # the cap binds where the unconstrained optimum has 0.6
        assert float(w[0]) == pytest.approx(study.CAP, abs=1e-12)


def test_lost_weight_recovers_with_projected_sgd(study: ModuleType, problems: dict) -> None:
    """The documented recipe: sparsemax + Adam at lr 1 zeroes the 0.1 weight of (h);
    projected SGD from there reaches the optimum."""
    problem, opts = problems["(h)"]
    problem.optimum = study.active_set(*opts["ls"])
    problem.best = float(problem.loss(problem.optimum, None))
    gaps, w1, _ = study.run(problem, opts, "sparsemax Adam", 1.0, 0, 50)
    assert gaps[-1] > 1e-3
    assert bool((w1 == 0).any())
    w = torch.nn.Parameter(w1.clone())
    opt = cx.optim.Projected(torch.optim.SGD([w], lr=study.RECIPE_SGD_LR), [w])
    for _ in range(200):
        opt.zero_grad()
        problem.loss(w, None).backward()
        opt.step()
    assert float(problem.loss(w.detach(), None)) - problem.best <= 1e-6
    assert torch.allclose(w.detach(), problem.optimum, atol=1e-3)
