"""Optimizers for parameters that themselves live on the simplex.

* :class:`ExponentiatedGradient`: mirror descent with the entropy mirror map,
  ``p <- total * softmax(log p - lr * grad)``, exactly on the simplex after every step.
* :class:`Projected`: wraps any torch optimizer and projects chosen parameters back onto
  the simplex (exact Euclidean projection) after each of its steps.

Both keep bounds: ``ExponentiatedGradient(..., upper=)`` takes the KL projection onto the
capped simplex (the constrained softmax of the log-weights), ``Projected(..., lower=,
upper=, k=)`` the Euclidean projection onto the box-constrained or k-sparse simplex.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from convexmix._validation import (
    PROJECTION_METHODS,
    any_true,
    check_bound,
    check_choice,
    check_int,
    check_total,
    compute_dtype,
    is_on_simplex,
    normalize_dim,
)
from convexmix.errors import ConvexMixError, ConvexMixWarning
from convexmix.functional import project_simplex, project_sparse_simplex, softmax
from convexmix.functional._softmax import safe_softmax

#: Optimizers that scale each coordinate of the step: projected, they can stall.
_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
)

__all__ = ["ExponentiatedGradient", "Projected"]


def _check_bounds(
    p: Tensor, lower: float | Tensor | None, upper: float | Tensor | None, who: str
) -> None:
    """Parameters must start inside their bounds (to rounding)."""
    lower, upper = check_bound(lower, "lower"), check_bound(upper, "upper")
    v = p.detach()
    tol = 64 * torch.finfo(compute_dtype(v.dtype)).eps
    if upper is not None and not bool((v <= torch.as_tensor(upper, dtype=v.dtype) + tol).all()):
        raise ConvexMixError(
            f"{who} needs parameters at or below upper={_show(upper)}; got one of shape "
            f"{tuple(p.shape)} above it. Start inside, e.g. from "
            "cx.functional.project_simplex(p, upper=...)."
        )
    if lower is not None and not bool((v >= torch.as_tensor(lower, dtype=v.dtype) - tol).all()):
        raise ConvexMixError(
            f"{who} needs parameters at or above lower={_show(lower)}; got one below it."
        )


def _show(bound: float | Tensor) -> str:
    return f"tensor{tuple(bound.shape)}" if isinstance(bound, Tensor) else str(bound)


def _check_on_simplex(p: Tensor, dim: int, total: float, who: str) -> None:
    normalize_dim(p, dim, "parameter")
    if not is_on_simplex(p, dim, total):
        raise ConvexMixError(
            f"{who} needs parameters on the simplex (entries >= 0 summing to {total} along "
            f"dim={dim}); got one of shape {tuple(p.shape)} that is not. Start from "
            "probabilities, e.g. with torch.no_grad(): p.copy_(cx.functional.project_simplex(p))."
        )


class ExponentiatedGradient(Optimizer):
    r"""Exponentiated gradient (mirror descent) for parameters on the simplex.

    Each step is :math:`p \leftarrow t\,\mathrm{softmax}(\log p - \eta\, \nabla f)` along
    ``dim``, computed in log space (no overflow for any gradient) and renormalised, so
    the parameter is on the simplex after every step, to rounding. Zeros: a weight that
    is exactly 0 stays 0 forever (its log is -inf): start from the interior, e.g. uniform
    weights, unless you want an entry switched off for good.

    Where to start (docs/convergence.md): lr 0.3 to 1 reached the exact optimum in every
    capped run of the study (gradients of order 1); 0.1 in half of them in 1000 steps.

    Args:
        params: parameters (or groups) whose slices along ``dim`` lie on the simplex.
        lr: the step size eta, > 0.
        dim: the dimension that sums to ``total``.
        total: the sum, > 0.
        upper: a cap on every weight (a float, or a tensor that broadcasts to each
            parameter): each step is then the KL projection onto
            :math:`\{p \le u, \sum p = t\}` of the multiplicative update, i.e. the
            constrained softmax :math:`\min(u, c\,p\,e^{-\eta \nabla f})`.

    Example:
        >>> import torch, convexmix as cx
        >>> w = torch.nn.Parameter(torch.full((3,), 1 / 3))
        >>> opt = cx.optim.ExponentiatedGradient([w], lr=1.0)
        >>> for _ in range(200):
        ...     opt.zero_grad()
        ...     ((w - torch.tensor([0.7, 0.2, 0.1])) ** 2).sum().backward()
        ...     opt.step()
        >>> w.data
        tensor([0.7000, 0.2000, 0.1000])
        >>> w = torch.nn.Parameter(torch.full((3,), 1 / 3))
        >>> opt = cx.optim.ExponentiatedGradient([w], lr=1.0, upper=0.5)  # capped
        >>> for _ in range(200):
        ...     opt.zero_grad()
        ...     ((w - torch.tensor([0.7, 0.2, 0.1])) ** 2).sum().backward()
        ...     opt.step()
        >>> w.data
        tensor([0.5000, 0.3000, 0.2000])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        dim: int = -1,
        total: float = 1.0,
        upper: float | Tensor | None = None,
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConvexMixError(f"lr must be a finite number > 0; got {lr!r}.")
        upper = check_bound(upper, "upper")
        defaults = {"lr": float(lr), "dim": dim, "total": check_total(total), "upper": upper}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                _check_on_simplex(p, group["dim"], group["total"], "ExponentiatedGradient")
                _check_bounds(p, None, group["upper"], "ExponentiatedGradient")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One multiplicative step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, total = group["lr"], group["total"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = normalize_dim(p, group["dim"], "parameter")
                if any_true(~torch.isfinite(p.grad)):
                    raise ConvexMixError(
                        f"ExponentiatedGradient got a non-finite gradient (inf or NaN) for a "
                        f"parameter of shape {tuple(p.shape)}; the step would leave the "
                        "simplex. Skip or clip such steps (e.g. torch.nn.utils.clip_grad_norm_"
                        "(..., error_if_nonfinite=True), or torch.amp.GradScaler)."
                    )
                dtype = compute_dtype(p.dtype)
                z = torch.log(p.to(dtype)) - lr * p.grad.to(dtype)
                if group.get("upper") is not None:
                    p.copy_(softmax(z, d, total=total, upper=group["upper"]))
                    continue
                p.copy_(safe_softmax(z, d).mul_(total))
        return loss


class Projected(Optimizer):
    """Wrap any torch optimizer; after each step, project chosen parameters onto the simplex.

    The projection is exact (:func:`convexmix.functional.project_simplex`), so the chosen
    parameters sit on the simplex after every step and can have exact zeros. The wrapper
    shares the inner optimizer's ``param_groups`` and ``state`` (LR schedulers work on
    it), projects the chosen parameters once at construction, and its ``state_dict`` is
    the inner one plus a ``"projected"`` entry with its settings.

    Projected SGD converges to the constrained optimum. Adaptive optimizers (Adam) scale
    each coordinate before the Euclidean projection, and their fixed points need not be
    the constrained optimum: on a least-squares problem whose optimum is
    (0.8, 0.2, 0, 0), projected Adam stalls at (0.707, 0.285, 0, 0.008). Worse, when
    every gradient coordinate has the same sign (the log-loss of a mixture), Adam's
    normalised step is nearly uniform and the projection cancels it: projected Adam does
    not move (problem b of the convergence study, docs/convergence.md). Prefer SGD or
    :class:`ExponentiatedGradient`; wrapping an adaptive optimizer (Adam, AdamW, Adagrad,
    RMSprop and kin) warns.

    With ``upper=``, projected SGD reached the exact optimum in every run at lr 0.01 to 0.3
    (docs/convergence.md); with ``k=`` it can lock onto a wrong support (not convex).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (at least) ``params``.
        params: the parameters to keep on the simplex.
        dim: the dimension that sums to ``total``.
        total: the sum, > 0.
        method: the projection method (``"auto"``, ``"sort"``, ``"bisect"`` or ``"condat"``).
        lower: a lower bound on every entry (a float or a tensor that broadcasts to each
            parameter), or None (0): projects onto the capped simplex.
        upper: an upper bound, likewise, or None.
        k: keep at most ``k`` non-zeros per slice (the k-sparse simplex,
            :func:`~convexmix.functional.project_sparse_simplex`); not with bounds.

    Example:
        >>> import torch, convexmix as cx
        >>> w = torch.nn.Parameter(torch.full((3,), 1 / 3))
        >>> opt = cx.optim.Projected(torch.optim.SGD([w], lr=0.1), [w])
        >>> for _ in range(200):
        ...     opt.zero_grad()
        ...     ((w - torch.tensor([0.9, 0.3, -0.2])) ** 2).sum().backward()
        ...     opt.step()
        >>> w.data  # the projection of the target: an exact zero
        tensor([0.8000, 0.2000, 0.0000])
        >>> w = torch.nn.Parameter(torch.full((3,), 1 / 3))
        >>> opt = cx.optim.Projected(torch.optim.SGD([w], lr=0.1), [w], upper=0.6)
        >>> for _ in range(200):
        ...     opt.zero_grad()
        ...     ((w - torch.tensor([0.9, 0.3, -0.2])) ** 2).sum().backward()
        ...     opt.step()
        >>> w.data
        tensor([0.6000, 0.4000, 0.0000])
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Iterable[Tensor],
        *,
        dim: int = -1,
        total: float = 1.0,
        method: str = "auto",
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
        k: int | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ConvexMixError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}."
            )
        check_choice(method, PROJECTION_METHODS, "method")
        self.optimizer = optimizer
        self.projected = list(params)
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for i, p in enumerate(self.projected):
            if id(p) not in known:
                raise ConvexMixError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not optimised by the wrapped "
                    f"{type(optimizer).__name__}: add it to that optimizer first."
                )
            normalize_dim(p, dim, f"params[{i}]")
        self.dim, self.total, self.method = dim, check_total(total), method
        if k is not None:
            check_int(k, "k", optional=True)
            if lower is not None or upper is not None:
                raise ConvexMixError(
                    "k cannot be combined with lower/upper: the projection onto the k-sparse "
                    "simplex has no box; use one or the other."
                )
        self.lower, self.upper = check_bound(lower, "lower"), check_bound(upper, "upper")
        self.k = k
        if isinstance(optimizer, _ADAPTIVE):
            warnings.warn(
                f"Projected({type(optimizer).__name__}): per-coordinate step scaling and a "
                "Euclidean projection do not commute, and projected adaptive optimizers can "
                "stall away from the optimum (docs/convergence.md). Prefer "
                "torch.optim.SGD or cx.optim.ExponentiatedGradient.",
                ConvexMixWarning,
                stacklevel=2,
            )
        super().__init__([dict(g) for g in optimizer.param_groups], dict(optimizer.defaults))
        self.param_groups = optimizer.param_groups  # shared, not copied
        self.state = optimizer.state
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Project the chosen parameters onto the simplex (done after every step)."""
        lower, upper, k = self.lower, self.upper, self.k
        for p in self.projected:
            if k is not None:
                p.copy_(project_sparse_simplex(p, k, self.dim, total=self.total))
            elif lower is not None or upper is not None:
                p.copy_(project_simplex(p, self.dim, total=self.total, lower=lower, upper=upper))
            else:
                p.copy_(project_simplex(p, self.dim, total=self.total, method=self.method))

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """The wrapped optimizer's step, then the projection."""
        loss = self.optimizer.step(closure)
        self.project()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state["projected"] = {"dim": self.dim, "total": self.total, "method": self.method}
        for key in ("lower", "upper", "k"):  # only when set: unbounded dicts stay as they were
            if getattr(self, key) is not None:
                state["projected"][key] = getattr(self, key)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        settings = state.pop("projected", None)
        self.optimizer.load_state_dict(state)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if settings is not None:
            self.dim, self.total, self.method = (
                settings["dim"],
                settings["total"],
                settings["method"],
            )
            self.lower = settings.get("lower")
            self.upper = settings.get("upper")
            self.k = settings.get("k")

    def __repr__(self) -> str:
        return (
            f"Projected({type(self.optimizer).__name__}, {len(self.projected)} parameter(s), "
            f"dim={self.dim}, total={self.total}, method={self.method!r}"
            + (f", lower={_show(self.lower)}" if self.lower is not None else "")
            + (f", upper={_show(self.upper)}" if self.upper is not None else "")
            + (f", k={self.k}" if self.k is not None else "")
            + ")"
        )
