"""Learned model merging: ``theta = sum_k w_k theta_k`` with learned convex weights.

:class:`LearnedMerge` holds K models that share an architecture (the "ingredients") and
learns the weights of their convex combination, per model ("global"), per parameter
tensor ("per_tensor") or per module ("per_module", by the owning module's name). The
network runs as a parameter-free copy of the template whose parameters are properties:
each merged tensor is computed with the fused
:func:`~convexmix.functional.convex_combination` when the network reads it (once per
forward). Only the weights are parameters.

Memory: the ingredients are kept by reference (``detach()`` views of the given tensors):
no copies, no gradients, no ``.grad`` buffers. A training step holds the ingredients,
one merged copy of the parameters and the activations: merging a layer right before it
runs puts that merge's backward right after the layer's, so each parameter gradient is
consumed at once. The backward needs no gradient of any ingredient, only
``<grad, theta_k>`` per weight.

>>> import torch, convexmix as cx
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
>>> merge = cx.merge.LearnedMerge(models, granularity="per_tensor")
>>> merge.weights.shape  # (n_tensors, K): weight, bias
torch.Size([2, 4])
>>> merge(torch.randn(5, 3)).shape
torch.Size([5, 2])
>>> [n for n, _ in merge.named_parameters()]  # only the mixing weights are learned
['free']
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from convexmix._subclass import register_kind, subclass
from convexmix.errors import ConvexMixError, InvalidProbabilitiesError, ShapeError
from convexmix.functional import convex_combination
from convexmix.functional._registry import get_map

__all__ = ["LearnedMerge"]

Granularity = Literal["global", "per_tensor", "per_module"]
StateDict = Mapping[str, Tensor]


def _state_of(
    model: nn.Module | StateDict, i: int, buffer_names: set[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters, buffers) of ingredient ``i``, as detached views (no copies)."""
    if isinstance(model, nn.Module):
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        return params, buffers
    if isinstance(model, Mapping):
        tensors = {n: t.detach() for n, t in model.items() if isinstance(t, Tensor)}
        params = {n: t for n, t in tensors.items() if n not in buffer_names}
        buffers = {n: t for n, t in tensors.items() if n in buffer_names}
        return params, buffers
    raise ConvexMixError(
        f"models[{i}] must be an nn.Module or a state_dict; got {type(model).__name__}."
    )


def _check_same(template: dict[str, Tensor], other: dict[str, Tensor], i: int) -> None:
    missing = [n for n in template if n not in other]
    extra = [n for n in other if n not in template]
    shapes = [
        f"{n}: {tuple(other[n].shape)} (expected {tuple(t.shape)})"
        for n, t in template.items()
        if n in other and other[n].shape != t.shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        if shapes:
            parts.append("different shapes " + "; ".join(shapes))
        raise ShapeError(
            f"models[{i}] does not match the template architecture: " + ", ".join(parts) + "."
        )


def _group_names(names: list[str], granularity: str) -> tuple[list[str], list[int]]:
    """Group labels and, per tensor, its group index."""
    if granularity == "global":
        return ["all"], [0] * len(names)
    if granularity == "per_tensor":
        return list(names), list(range(len(names)))
    if granularity == "per_module":
        groups: dict[str, int] = {}  # owner module -> group, in order of first appearance
        index = [
            groups.setdefault(name.rsplit(".", 1)[0] if "." in name else "", len(groups))
            for name in names
        ]
        return list(groups), index
    raise ConvexMixError(
        f"granularity must be 'global', 'per_tensor' or 'per_module'; got {granularity!r}."
    )


def _merged_property(local: str) -> property:
    def fget(module: nn.Module) -> Tensor:
        owner: LearnedMerge = module.__dict__["_cx_merge"]
        return owner._tensor(module.__dict__["_cx_index"][local])

    return property(fget, doc=f"``{local}``: the merged tensor, computed when it is read.")


register_kind("Merged", lambda names: {name: _merged_property(name) for name in names})


class LearnedMerge(nn.Module):
    r"""A learned soup of K models: ``theta_g = sum_k w_{g,k} theta_{k,g}`` per group g.

    Args:
        models: K models with the same architecture (``nn.Module``), or K state_dicts
            together with ``template``.
        granularity: "global" (one weight per model: ``weights`` is (K,)),
            "per_tensor" (one simplex per parameter tensor: (n_tensors, K), rows in the
            template's ``named_parameters()`` order) or "per_module" (one simplex per
            module owning parameters: (n_modules, K), in order of first appearance;
            ``group_names`` lists them).
        map: the simplex map of the weights (see ``cx.functional``).
        init: "uniform", or probabilities: (K,) (shared by every group) or (G, K).
        template: the architecture, by default ``models[0]``. The network runs as a copy
            of it without parameters (``net``; buffers copied, parameters replaced by
            merged tensors), so the template's own parameters are never read, trained
            or copied.
        buffers: "first" (copy model 0's buffers, e.g. BatchNorm running statistics) or
            "mean" (the mean of the models' floating-point buffers; others from model 0).
            They become this module's own buffers, saved in its ``state_dict`` and
            updated by the template's usual rules (BatchNorm in train mode), so the
            ingredients are never modified.

    ``forward(*args, **kwargs)`` runs ``net``, the template's copy, on the merged
    parameters. :meth:`merged_state_dict` and :meth:`merged_model` export a plain model.

    Example:
        >>> import torch, convexmix as cx
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> merge = cx.merge.LearnedMerge([a, b], init=[0.25, 0.75])
        >>> expected = 0.25 * a.weight + 0.75 * b.weight
        >>> torch.allclose(merge.merged_state_dict()["weight"], expected)
        True
    """

    def __init__(
        self,
        models: Sequence[nn.Module | StateDict],
        *,
        granularity: Granularity = "global",
        map: str = "softmax",
        init: str | Sequence[float] | Tensor = "uniform",
        template: nn.Module | None = None,
        buffers: Literal["first", "mean"] = "first",
    ) -> None:
        super().__init__()
        if isinstance(models, (nn.Module, Mapping)) or len(models) < 1:
            raise ConvexMixError("models must be a sequence of K >= 1 models or state_dicts.")
        if template is None:
            if not isinstance(models[0], nn.Module):
                raise ConvexMixError(
                    "with state_dicts, give template=, a module of the same architecture."
                )
            template = models[0]
        if buffers not in ("first", "mean"):
            raise ConvexMixError(f"buffers must be 'first' or 'mean'; got {buffers!r}.")
        self.map = get_map(map).name
        self.granularity = granularity
        t_params = {n: p.detach() for n, p in template.named_parameters()}
        if not t_params:
            raise ConvexMixError("the template has no parameters to merge.")
        buffer_names = {n for n, _ in template.named_buffers()}
        states = [_state_of(m, i, buffer_names) for i, m in enumerate(models)]
        for i, (params, _) in enumerate(states):
            _check_same(t_params, params, i)
        self.param_names = list(t_params)
        self.group_names, self._group_of = _group_names(self.param_names, granularity)
        # Plain attributes, not parameters or buffers: never trained, never saved.
        self.__dict__["_template"] = template
        self.__dict__["_ingredients"] = {
            n: [states[k][0][n] for k in range(len(models))] for n in self.param_names
        }
        self.n_models = len(models)
        self.net = self._skeleton(template)
        if buffers == "mean":
            with torch.no_grad():
                for name, b in self.net.named_buffers():
                    parts = [st[1].get(name) for st in states]
                    if b.is_floating_point() and all(p is not None for p in parts):
                        b.copy_(
                            torch.stack([p.to(b.dtype) for p in parts if p is not None]).mean(0)
                        )
        self._cx_cache: dict[int, Tensor] | None = None
        self._cx_weights: Tensor | None = None
        self.free = nn.Parameter(self._initial_free(init))

    # ------------------------------------------------------------------ weights

    def _initial_free(self, init: str | Sequence[float] | Tensor) -> Tensor:
        G, K = len(self.group_names), self.n_models
        shape = (K,) if self.granularity == "global" else (G, K)
        if isinstance(init, str):
            if init != "uniform":
                raise ConvexMixError(f"init must be 'uniform' or probabilities; got {init!r}.")
            p = torch.full(shape, 1.0 / K, dtype=torch.float64)
        else:
            p = torch.as_tensor(init, dtype=torch.float64).detach().clone()
            if p.shape == (K,):
                p = p.expand(shape).clone()
            if p.shape != shape:
                raise ShapeError(
                    f"init must be (K,) = ({K},) or {shape} probabilities; "
                    f"got shape {tuple(p.shape)}."
                )
            if bool((p < 0).any()) or bool(((p.sum(-1) - 1).abs() > 1e-6).any()):
                raise InvalidProbabilitiesError(
                    "init takes probabilities (>= 0, each row summing to 1), not logits."
                )
        free = get_map(self.map).inverse(p, -1, 1.0)
        return free.to(torch.get_default_dtype())

    @property
    def weights(self) -> Tensor:
        """The current weights: (K,) for "global", (G, K) otherwise (G groups)."""
        return get_map(self.map).forward(self.free, -1)

    # ------------------------------------------------------------------ merging

    def _skeleton(self, template: nn.Module) -> nn.Module:
        """A copy of the template without parameters: each one becomes a property that
        merges the ingredients when it is read, so a layer's merge runs right before the
        layer, and its backward (which consumes that layer's gradient) right after the
        layer's backward. Parameters are copied as empty meta tensors; buffers for real.
        """
        memo: dict[int, Any] = {
            id(p): torch.empty_like(p, device="meta") for p in template.parameters()
        }
        position = {n: i for i, n in enumerate(self.param_names)}
        tensor_of = {id(memo[id(p)]): position[n] for n, p in template.named_parameters()}
        skeleton = copy.deepcopy(template, memo)
        for module in skeleton.modules():
            index = {}
            for local, p in list(module._parameters.items()):
                if p is not None:
                    index[local] = tensor_of[id(p)]
                    del module._parameters[local]
            if index:
                module.__class__ = subclass("Merged", type(module), tuple(sorted(index)))
                module.__dict__["_cx_merge"] = self
                module.__dict__["_cx_index"] = index
        return skeleton

    def _tensor(self, i: int) -> Tensor:
        """Merged tensor ``i`` (once per forward: cached while the network runs)."""
        cache = self._cx_cache
        if cache is not None and i in cache:
            return cache[i]
        w = self._cx_weights if self._cx_weights is not None else self.weights
        row = w if w.dim() == 1 else w[self._group_of[i]]
        xs: list[Tensor] = self.__dict__["_ingredients"][self.param_names[i]]
        out = convex_combination(row.to(xs[0].dtype), xs)
        if cache is not None:
            cache[i] = out
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._cx_cache, self._cx_weights = {}, self.weights
        try:
            return self.net(*args, **kwargs)
        finally:
            self._cx_cache, self._cx_weights = None, None

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged parameters and this module's buffers, as a template state_dict."""
        state = {n: self._tensor(i).clone() for i, n in enumerate(self.param_names)}
        state.update({n: b.detach().clone() for n, b in self.net.named_buffers()})
        return state

    def merged_model(self) -> nn.Module:
        """A plain copy of the template holding the merged parameters (same outputs)."""
        template: nn.Module = self.__dict__["_template"]
        model = copy.deepcopy(template)
        model.load_state_dict(self.merged_state_dict())
        return model

    # ------------------------------------------------------------------ plumbing

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LearnedMerge:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        ingredients: dict[str, list[Tensor]] = self.__dict__["_ingredients"]
        for name, xs in ingredients.items():
            ingredients[name] = [fn(x) for x in xs]
        return self

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, granularity={self.granularity!r}, "
            f"groups={len(self.group_names)}, map={self.map!r}, tensors={len(self.param_names)}"
        )
