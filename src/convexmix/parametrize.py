"""Constrain any parameter to the simplex.

Two ways, same maps:

* :class:`Simplex` is a parametrization for
  ``torch.nn.utils.parametrize.register_parametrization`` (torch's mechanism: the
  module can then be saved only through its ``state_dict``).
* :func:`simplex_` constrains ``module.<name>`` in place with a mechanism that
  ``torch.save(model)``, ``pickle`` and ``copy.deepcopy`` handle; :func:`remove_simplex_`
  undoes it and leaves a plain parameter holding the current weights.

Starting points. A value already on the simplex (entries >= 0 summing to ``total``, to
the rounding of its dtype: ``64 sqrt(K)`` ulps, or ``2 K`` ulps of half precision) is kept
exactly. Any other value, such as a
freshly initialised ``nn.Linear`` weight, is replaced by its Euclidean projection onto
the simplex (``sparsemax(value, total=total)``) and a :class:`~convexmix.errors.ConvexMixWarning`
says so. With the softmax map, zeros of that point start at the logit
``log(SOFTMAX_ZERO_EPS)``; assign uniform weights after registration to start from the
centre instead.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from convexmix._subclass import base_class, register_kind, subclass
from convexmix._validation import (
    check_dim,
    check_positive,
    check_temperature,
    check_tensor,
    check_total,
    compute_dtype,
    is_on_simplex,
    normalize_dim,
    simplex_tolerance,
)
from convexmix.errors import ConvexMixError, ConvexMixWarning, ShapeError
from convexmix.functional import project_simplex, sparsemax
from convexmix.functional._registry import MAPS, MapSpec, get_map

__all__ = ["Simplex", "remove_simplex_", "simplex_"]

#: Suffix of the free parameter that :func:`simplex_` registers: ``weight`` -> ``weight_free``.
FREE_SUFFIX = "_free"


def to_simplex(
    value: Tensor, dim: int, total: float, *, what: str = "value", warn: bool = True
) -> Tensor:
    """``value`` if it lies on the simplex (to rounding), else its projection (with a
    warning unless ``warn`` is False)."""
    d = normalize_dim(value, dim, what)
    p = value.detach().to(compute_dtype(value.dtype))
    if not bool(p.isfinite().all()):
        raise ConvexMixError(f"{what} must be finite to start on the simplex; it has NaN or inf.")
    if is_on_simplex(value, d, total):
        return p.clamp_min(0).to(value.dtype)
    if warn:
        warnings.warn(
            f"{what} of shape {tuple(value.shape)} is not on the simplex along dim={dim} "
            f"(entries >= 0 summing to {total}); starting from its Euclidean projection.",
            ConvexMixWarning,
            stacklevel=3,
        )
    return sparsemax(p, d, total=total).to(value.dtype)


def takes_upper(spec: MapSpec) -> bool:
    """Whether a registered map takes ``upper=`` (read from its signature: the registry
    stays the one place that knows the maps)."""
    return "upper" in inspect.signature(spec.forward).parameters


def check_upper(upper: float | None, spec: MapSpec) -> float | None:
    """A cap on every weight: None or a finite float > 0, for the maps that support it."""
    if upper is None:
        return None
    value = check_positive(upper, "upper", optional=True)
    if not takes_upper(spec):
        capped = " or ".join(f"map={name!r}" for name, other in MAPS.items() if takes_upper(other))
        raise ConvexMixError(
            f"upper= needs {capped} (a map that takes a cap: the constrained softmax, the "
            f"capped projection); got map={spec.name!r}."
        )
    return value


def check_capacity(k: int, total: float, upper: float | None) -> None:
    """K weights capped at ``upper`` can sum to ``total`` only if ``K * upper >= total``."""
    if upper is not None and k * upper < total * (1 - 1e-12):
        raise ConvexMixError(
            f"infeasible cap: {k} weights of at most upper={upper} sum to at most "
            f"{k * upper:.6g} < total={total}."
        )


def to_capped(p: Tensor, dim: int, total: float, upper: float, *, warn: bool = True) -> Tensor:
    """``p`` (on the simplex) if every entry is <= ``upper``, else its projection onto the
    capped simplex (with a warning unless ``warn`` is False)."""
    check_capacity(p.shape[dim], total, upper)
    tol = simplex_tolerance(p.dtype, p.shape[dim], total)
    if bool((p <= upper + tol).all()):
        return p.clamp_max(upper)
    if warn:
        warnings.warn(
            f"value has entries above upper={upper}; starting from its projection onto the "
            "capped simplex.",
            ConvexMixWarning,
            stacklevel=3,
        )
    return project_simplex(p, dim, total=total, upper=upper)


class Simplex(nn.Module):
    """Parametrization onto the simplex: ``forward(free) = map(free / temperature)``.

    Use it with ``torch.nn.utils.parametrize.register_parametrization``. torch calls
    :meth:`right_inverse` on the existing value at registration, so registering on a
    random ``nn.Linear`` weight works: it starts from the Euclidean projection of that
    weight (with a warning); assigning probabilities later (``module.weight = p``)
    reproduces them.

    The sampling maps ``"gumbel"`` and ``"gumbel_soft"`` draw a new sample at each call
    in training mode (``train()``, as any module) and give a deterministic output in
    ``eval()``: see :func:`~convexmix.functional.gumbel_softmax`. Their temperature is
    the sampler's ``tau``, and the free values are the logits of the categorical that
    the samples follow (``right_inverse(p)`` gives ``log p``).

    Learning rate (docs/convergence.md): with Adam on the free values, ``"sparsemax"`` is
    exact at 3e-3 to 0.03 but can zero a weight for good above; softmax held 0.01 to 1.

    Args:
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, ``"stick_breaking"``,
            ``"gumbel"`` or ``"gumbel_soft"``.
        dim: the dimension of the constrained tensor that sums to ``total``.
        total: the sum, > 0.
        temperature: divides the free values before the map, > 0 (the sampling maps:
            their ``tau``).
        upper: a cap on every weight (``"softmax"``: the constrained softmax,
            ``"sparsemax"``: the capped projection), a float > 0 with
            ``K * upper >= total``; None for no cap.

    Example:
        >>> import torch, convexmix as cx
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", cx.Simplex("sparsemax"))
        >>> layer.weight.sum(-1)  # started from the projection of the random weight
        tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
        >>> layer.weight = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
        >>> layer.weight
        tensor([[0.1000, 0.2000, 0.3000, 0.4000],
                [0.5000, 0.5000, 0.0000, 0.0000]], grad_fn=<...>)
        >>> s = cx.Simplex("softmax")
        >>> s(torch.zeros(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
        >>> s(s.right_inverse(torch.tensor([0.1, 0.2, 0.3, 0.4])))
        tensor([0.1000, 0.2000, 0.3000, 0.4000])
        >>> cx.Simplex("softmax", upper=0.3)(torch.tensor([3.0, 0.0, 0.0, 0.0]))
        tensor([0.3000, 0.2333, 0.2333, 0.2333])
    """

    #: the cap (class default: modules pickled before caps existed load uncapped)
    upper: float | None = None

    def __init__(
        self,
        map: str = "softmax",
        dim: int = -1,
        total: float = 1.0,
        temperature: float = 1.0,
        upper: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = get_map(map, stochastic=True)
        self.dim = check_dim(dim)
        self.total = check_total(total)
        t = check_temperature(temperature)
        if isinstance(t, Tensor):
            raise ConvexMixError("Simplex takes a float temperature; got a tensor.")
        self.temperature = t
        self.upper = check_upper(upper, self.spec)

    @property
    def map(self) -> str:
        """The name of the map."""
        return self.spec.name

    def forward(self, free: Tensor, mask: Tensor | None = None) -> Tensor:
        """Map free values (size K, or K-1 for stick-breaking, along ``dim``) to weights.

        The one route from free values to weights: every layer (``SimplexWeights``,
        ``WeightedSum``, ``LazyWeightedSum``, ``ScalarMix``) and :func:`simplex_` get their
        weights from this call, which carries every option (map, temperature, total,
        upper, mask) to the map.

        Args:
            free: the free values, any shape (``K`` or ``K - 1`` along ``dim``).
            mask: bool, True = present, broadcastable to the weights; restricts the map
                to the present entries (absent ones are exactly 0, a slice with nothing
                present is zeros). Under ``upper``, the present entries of each slice
                must be able to carry ``total``.

        Returns:
            The weights: ``free``'s shape (one more along ``dim`` for stick-breaking).
        """
        if self.spec.stochastic:  # the temperature is the sampler's tau, not a divisor
            sample: Tensor = self.spec.forward(
                free,
                self.dim,
                mask=mask,
                total=self.total,
                tau=self.temperature,
                training=self.training,
            )
            return sample
        z = free
        if self.temperature != 1.0:
            # in the maps' compute dtype: a float16/bfloat16 quotient would round the
            # logits to 8 bits before the map's float32 (and move sparse supports)
            z = (free if free.dtype.itemsize > 2 else free.float()) / self.temperature
        upper = self.upper
        if upper is None:
            out: Tensor = self.spec.forward(z, self.dim, mask=mask, total=self.total)
        else:
            out = self.spec.forward(z, self.dim, mask=mask, total=self.total, upper=upper)
        return out if out.dtype == free.dtype else out.to(free.dtype)

    def right_inverse(self, value: Tensor, *, warn: bool = True) -> Tensor:
        """Free values whose image is ``value``.

        A ``value`` off the simplex (or above ``upper``) is first projected onto it, with a
        :class:`~convexmix.errors.ConvexMixWarning` unless ``warn`` is False (the layers
        pass False for an ``init`` they document as projected)."""
        check_tensor(value, "value")
        p = to_simplex(value, self.dim, self.total, warn=warn)
        d = normalize_dim(p, self.dim)
        if self.upper is not None:
            p = to_capped(p, d, self.total, self.upper, warn=warn)
        free = self.spec.inverse(p, d, self.total)
        if self.temperature == 1.0 or self.spec.stochastic:
            return free
        return free * self.temperature

    def free_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the free tensor behind weights of ``shape``."""
        out = list(shape)
        d = self.dim % len(out)
        out[d] -= self.spec.drop
        return tuple(out)

    def weights_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the weights that free values of ``shape`` give (inverse of
        :meth:`free_shape`)."""
        out = list(shape)
        d = self.dim % len(out)
        out[d] += self.spec.drop
        return tuple(out)

    def extra_repr(self) -> str:
        s = f"map={self.map!r}, dim={self.dim}, total={self.total}"
        if self.temperature != 1.0:
            s += f", temperature={self.temperature}"
        if self.upper is not None:
            s += f", upper={self.upper}"
        return s


# ----------------------------------------------------------------------------- simplex_


def simplex_constraints(module: nn.Module) -> dict[str, Simplex]:
    """The :class:`Simplex` constraints that :func:`simplex_` put on ``module``, by name."""
    found: dict[str, Simplex] = module.__dict__.get("_convexmix_simplex", {})
    return found


def _make_property(name: str) -> property:
    free_name = name + FREE_SUFFIX

    def fget(self: nn.Module) -> Tensor:
        # forward, not __call__: the constraint is no submodule, so it has no hooks to run
        simplex = simplex_constraints(self)[name]
        training = self.training
        if simplex.training is not training:  # a sampling map follows its module's mode
            # a plain attribute: nn.Module.__setattr__'s checks would cost ~1.5 us a read
            object.__setattr__(simplex, "training", training)
        out: Tensor = simplex.forward(getattr(self, free_name))
        return out

    def fset(self: nn.Module, value: Tensor) -> None:
        simplex = simplex_constraints(self)[name]
        free: Tensor = getattr(self, free_name)
        check_tensor(value, name)
        new = simplex.right_inverse(value.to(device=free.device, dtype=free.dtype))
        if new.shape != free.shape:
            raise ShapeError(
                f"cannot assign a value of shape {tuple(value.shape)} to {name}; "
                f"expected {tuple(simplex(free).shape)}."
            )
        with torch.no_grad():
            free.copy_(new)

    return property(fget, fset, doc=f"``{name}`` on the simplex, from ``{free_name}``.")


def _setattr(self: nn.Module, key: str, value: Any) -> None:
    if key in simplex_constraints(self):
        object.__setattr__(self, key, value)  # the property's setter
    else:
        base_class(self).__setattr__(self, key, value)


def _extra_repr(self: nn.Module) -> str:
    base = base_class(self).extra_repr(self)
    parts = [base] if base else []
    parts += [f"{n}: Simplex({s.extra_repr()})" for n, s in simplex_constraints(self).items()]
    return ", ".join(parts)


def _load_from_state_dict(
    self: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    # Accept the plain key ``prefix + name`` (e.g. a checkpoint of the unconstrained model).
    for name, simplex in simplex_constraints(self).items():
        plain, free = prefix + name, prefix + name + FREE_SUFFIX
        if plain in state_dict and free not in state_dict:
            value = state_dict.pop(plain)
            state_dict[free] = simplex.right_inverse(value)
    base_class(self)._load_from_state_dict(self, state_dict, prefix, *args)


def _namespace(names: tuple[str, ...]) -> dict[str, Any]:
    namespace: dict[str, Any] = {name: _make_property(name) for name in names}
    namespace.update(
        __setattr__=_setattr,
        extra_repr=_extra_repr,
        _load_from_state_dict=_load_from_state_dict,
    )
    return namespace


register_kind("Simplex", _namespace)


def _simplex_class(base: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    return subclass("Simplex", base, names)


def simplex_(
    module: nn.Module,
    name: str,
    *,
    map: str = "softmax",
    dim: int = -1,
    total: float = 1.0,
    temperature: float = 1.0,
    upper: float | None = None,
) -> nn.Module:
    """Constrain ``module.<name>`` to the simplex in place, starting from its current value.

    The parameter ``name`` is replaced by a free parameter ``name + "_free"`` (the key in
    ``state_dict``) and ``module.<name>`` becomes ``map(free)``, recomputed at each access.
    Assigning ``module.<name> = p`` stores the right inverse of ``p``. A ``state_dict`` with
    the plain key ``name`` (from the unconstrained model) also loads. The module keeps its
    class (a subclass of it), pickles, saves with ``torch.save(model)`` and deep-copies.
    Build the optimizer after this call: the free parameter is a new tensor.

    Args:
        module: any module with a parameter ``name``.
        name: the parameter to constrain.
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, ``"stick_breaking"``, or a
            sampling map, ``"gumbel"`` or ``"gumbel_soft"`` (a sample at each access while
            ``module`` is in training mode; see :class:`Simplex`).
        dim: the dimension of the parameter that sums to ``total``.
        total: the sum, > 0.
        temperature: divides the free values before the map, > 0.
        upper: a cap on every entry (``"softmax"`` and ``"sparsemax"`` only), or None.

    Returns:
        ``module``, constrained.

    Example:
        >>> import torch, convexmix as cx
        >>> layer = torch.nn.Linear(3, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
        >>> cx.simplex_(layer, "weight", map="sparsemax")  # doctest: +ELLIPSIS
        SimplexLinear(in_features=3, ..., weight: Simplex(map='sparsemax', dim=-1, total=1.0))
        >>> layer.weight.sum(-1)
        tensor([1., 1.], grad_fn=<SumBackward1>)
        >>> sorted(layer.state_dict())
        ['weight_free']
    """
    if not isinstance(module, nn.Module):
        raise ConvexMixError(f"module must be a torch.nn.Module; got {type(module).__name__}.")
    if not isinstance(name, str):
        raise ConvexMixError(f"name must be a str; got {type(name).__name__}.")
    if name in simplex_constraints(module):
        raise ConvexMixError(
            f"{type(module).__name__}.{name} is already constrained to the simplex."
        )
    param = module._parameters.get(name)
    if param is None:
        known = [n for n, p in module._parameters.items() if p is not None]
        raise ConvexMixError(
            f"{type(module).__name__} has no parameter {name!r}; its parameters are {known}."
        )
    free_name = name + FREE_SUFFIX
    if hasattr(module, free_name):
        raise ConvexMixError(f"cannot add {free_name!r}: {type(module).__name__} already has it.")
    normalize_dim(param, dim, f"parameter {name!r}")
    simplex = Simplex(map, dim, total, temperature, upper=upper)
    with torch.no_grad():
        free = simplex.right_inverse(param.detach())
    # Only now that everything is checked do we touch the module.
    names = (*simplex_constraints(module), name)
    constraints = {**simplex_constraints(module), name: simplex}
    del module._parameters[name]
    module.register_parameter(free_name, nn.Parameter(free, requires_grad=param.requires_grad))
    object.__setattr__(module, "_convexmix_simplex", constraints)
    module.__class__ = _simplex_class(base_class(module), names)
    return module


def remove_simplex_(module: nn.Module, name: str) -> nn.Module:
    """Undo :func:`simplex_`: ``module.<name>`` becomes a plain parameter with the current weights.

    Example:
        >>> import torch, convexmix as cx
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> layer.weight = torch.nn.Parameter(torch.tensor([[0.25, 0.75]]))
        >>> _ = cx.simplex_(layer, "weight")
        >>> cx.remove_simplex_(layer, "weight")
        Linear(in_features=2, out_features=1, bias=False)
        >>> layer.weight
        Parameter containing:
        tensor([[0.2500, 0.7500]], requires_grad=True)
    """
    constraints = dict(simplex_constraints(module))
    if name not in constraints:
        raise ConvexMixError(
            f"{type(module).__name__}.{name} is not constrained by convexmix.simplex_; "
            f"constrained: {sorted(constraints)}."
        )
    free: Tensor = getattr(module, name + FREE_SUFFIX)
    with torch.no_grad():
        value = getattr(module, name).detach().clone()
    base = base_class(module)
    del module._parameters[name + FREE_SUFFIX]
    del constraints[name]
    if constraints:
        object.__setattr__(module, "_convexmix_simplex", constraints)
        module.__class__ = _simplex_class(base, tuple(constraints))
    else:
        del module.__dict__["_convexmix_simplex"]
        module.__class__ = base
    module.register_parameter(name, nn.Parameter(value, requires_grad=free.requires_grad))
    return module
