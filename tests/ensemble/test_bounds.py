"""fit_weights(max_weight=, max_models=) against SLSQP with bounds and brute force over
supports; the CLI flags."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import convexmix as cx
from convexmix.cli import main
from convexmix.ensemble import fit_weights


def make_problem(k: int, n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    strength = torch.rand(k, 1, 1, generator=g, dtype=torch.float64) * 2.5
    noise = torch.randn(k, n, c, generator=g, dtype=torch.float64) * 1.5
    logits = noise + torch.nn.functional.one_hot(y, c) * strength
    return logits.softmax(-1), y


def log_loss(p: torch.Tensor, y: torch.Tensor, w: np.ndarray) -> float:
    blend = torch.tensordot(torch.as_tensor(w), p, dims=1)
    q = blend[torch.arange(len(y)), y].clamp_min(1e-15)
    return float(-torch.log(q).mean())


def slsqp(p: torch.Tensor, y: torch.Tensor, cap: float, support: list[int] | None = None) -> float:
    k = p.shape[0]
    idx = list(range(k)) if support is None else support
    q = p[:, torch.arange(len(y)), y].double().clamp_min(1e-15).numpy()[idx]

    def f(v: np.ndarray) -> float:
        return float(-np.log(v @ q).mean())

    def grad(v: np.ndarray) -> np.ndarray:
        return -(q / (v @ q)).mean(1)

    best = np.inf
    for s in range(3):
        x0 = np.random.default_rng(s).dirichlet(np.ones(len(idx)))
        x0 = np.minimum(x0, cap)
        x0 = x0 + (1 - x0.sum()) * (cap - x0) / max((cap - x0).sum(), 1e-300)
        r = minimize(
            f,
            x0,
            jac=grad,
            method="SLSQP",
            bounds=[(0.0, cap)] * len(idx),
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if abs(r.x.sum() - 1) < 1e-9 and (r.x <= cap + 1e-9).all():
            best = min(best, f(np.clip(r.x, 0, cap)))
    return best


@pytest.mark.parametrize(("seed", "cap"), [(0, 0.3), (1, 0.2), (2, 0.45)])
def test_max_weight_at_or_below_slsqp(seed: int, cap: float) -> None:
    p, y = make_problem(7, 300, 3, seed)
    res = fit_weights(p, y, max_weight=cap)
    assert res.converged
    assert float(res.weights.max()) <= cap + 1e-12
    assert float(res.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert res.loss == pytest.approx(log_loss(p, y, res.weights.numpy()), abs=1e-12)
    assert res.loss <= slsqp(p, y, cap) + 1e-7
    loose = fit_weights(p, y, max_weight=1.0)
    assert loose.loss == pytest.approx(fit_weights(p, y).loss, abs=1e-9)


@pytest.mark.parametrize(("k", "cap"), [(1, 1.0), (2, 1.0), (3, 0.4)])
def test_max_models_at_or_below_brute_force(k: int, cap: float) -> None:
    p, y = make_problem(7, 200, 3, seed=3)
    res = fit_weights(p, y, max_models=k, max_weight=cap)
    assert int((res.weights > 0).sum()) <= k
    assert res.method == "branch-and-bound"
    best = np.inf
    for support in itertools.combinations(range(7), k):
        if k * cap < 1 - 1e-12:
            continue
        sub = fit_weights(p[list(support)], y, max_weight=cap if cap < 1 else None)
        best = min(best, sub.loss)
    assert res.loss <= best + 1e-9


def test_max_models_mse_and_large_k_heuristic() -> None:
    g = torch.Generator().manual_seed(5)
    target = torch.randn(400, generator=g, dtype=torch.float64)
    preds = target + torch.randn(30, 400, generator=g, dtype=torch.float64)
    res = fit_weights(preds, target, loss="mse", max_models=4)
    assert res.method == "forward-swap"  # K = 30 > 24: the documented heuristic
    assert int((res.weights > 0).sum()) <= 4
    uniform4 = fit_weights(preds[:4], target, loss="mse").loss
    assert res.loss <= uniform4  # no worse than an arbitrary support of 4


def test_constraint_errors() -> None:
    p, y = make_problem(4, 50, 2, seed=0)
    with pytest.raises(cx.ConvexMixError, match=r"infeasible: 4 model\(s\) .* max_weight=0.2"):
        fit_weights(p, y, max_weight=0.2)
    with pytest.raises(
        cx.ConvexMixError, match=r"infeasible: 2 model\(s\) .* \(need max_weight >= 1/2\)"
    ):
        fit_weights(p, y, max_weight=0.4, max_models=2)
    with pytest.raises(cx.ConvexMixError, match=r"max_models must be an int >= 1; got 0"):
        fit_weights(p, y, max_models=0)
    with pytest.raises(cx.ConvexMixError, match=r"max_weight must be finite and > 0; got -1"):
        fit_weights(p, y, max_weight=-1.0)
    with pytest.raises(cx.ConvexMixError, match=r"regularization='cv' is not available"):
        fit_weights(p, y, max_weight=0.5, regularization="cv")


def test_cli_max_weight_and_max_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, y = make_problem(5, 200, 3, seed=7)
    np.save(tmp_path / "p.npy", p.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "w.json"
    args = ["ensemble", "--predictions", str(tmp_path / "p.npy"), "--targets"]
    args += [str(tmp_path / "y.npy"), "--max-weight", "0.4", "--max-models", "3"]
    code = main([*args, "--out", str(out), "--quiet", "--size", "10"])
    text = capsys.readouterr().out
    assert code == 0
    assert "max weight 0.4, max 3 models" in text
    saved = json.loads(out.read_text())
    w = np.array(saved["weights"])
    assert (w <= 0.4 + 1e-12).all()
    assert (w > 0).sum() <= 3
    assert saved["max_weight"] == 0.4
    assert saved["max_models"] == 3
    code = main([*args[:-4], "--max-weight", "0.1", "--quiet"])
    assert code != 0
    assert "infeasible" in capsys.readouterr().err
