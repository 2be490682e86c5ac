"""Learned model merging: ``theta = sum_k w_k theta_k`` with learned convex weights,
and task arithmetic ``theta = theta_base + scale * sum_k w_k (theta_k - theta_base)``.

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

Task arithmetic (``base=``) folds the base into the same fused combination of K + 1
tensors, ``theta = (1 - scale) theta_base + sum_k scale w_k theta_k``, so it costs no
more memory than the soup. :func:`entropy_loss` is AdaMerging's label-free objective,
and :meth:`LearnedMerge.from_safetensors` memory-maps the ingredients from disk.

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
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from convexmix._subclass import register_kind, subclass
from convexmix._validation import check_positive, check_probabilities, is_number
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError
from convexmix.functional import convex_combination
from convexmix.functional._registry import get_map

__all__ = ["LearnedMerge", "entropy_loss"]

Granularity = Literal["global", "per_tensor", "per_module"]
StateDict = Mapping[str, Tensor]
Scale = float | Literal["learn", "learn_per_group"]
PathLike = str | os.PathLike[str]


def _state_of(
    model: nn.Module | StateDict, label: str, buffer_names: set[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters, buffers) of one ingredient (or the base), as detached views (no copies)."""
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
        f"{label} must be an nn.Module or a state_dict; got {type(model).__name__}."
    )


def _check_same(template: dict[str, Tensor], other: dict[str, Tensor], label: str) -> None:
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
            f"{label} does not match the template architecture: " + ", ".join(parts) + "."
        )


def _check_dtypes(
    names: list[str], states: list[dict[str, Tensor]], base: dict[str, Tensor] | None
) -> None:
    """Every ingredient (and the base) of a tensor must share one floating dtype."""
    for name in names:
        dtype = states[0][name].dtype
        others = [(f"models[{k}]", st[name]) for k, st in enumerate(states)]
        if base is not None:
            others.append(("base", base[name]))
        for label, t in others:
            if t.dtype != dtype or not t.is_floating_point():
                raise ConvexMixError(
                    f"{label}: tensor {name!r} has dtype {t.dtype}, but models[0]'s is "
                    f"{dtype}; the ingredients and the base must share one floating dtype "
                    "(convert them first, e.g. model.float())."
                )


def _check_scale(scale: object, scale_init: float, has_base: bool) -> str | None:
    """Validate ``scale``; return "learn"/"learn_per_group" when it is learned."""
    if isinstance(scale, str):
        if scale not in ("learn", "learn_per_group"):
            raise ConvexMixError(
                f"scale must be a float, 'learn' or 'learn_per_group'; got {scale!r}."
            )
        if not has_base:
            raise ConvexMixError(
                f"scale={scale!r} needs base=, the model the task vectors start from."
            )
        check_positive(scale_init, "scale_init")
        return scale
    if not is_number(scale):
        raise ConvexMixTypeError(
            f"scale must be a float, 'learn' or 'learn_per_group'; got {type(scale).__name__}."
        )
    if not math.isfinite(scale):
        raise ConvexMixError(f"scale must be finite; got {scale!r}.")
    if scale != 1.0 and not has_base:
        raise ConvexMixError(
            f"scale={scale!r} needs base=: without a base the merge is the convex soup (scale 1)."
        )
    return None


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
    r"""A learned soup of K models, ``theta_g = sum_k w_{g,k} theta_{k,g}`` per group g,
    or their task arithmetic around a base model (``base=``):

    .. math::

        \theta_g = \theta_{base,g} + s_g \sum_k w_{g,k} (\theta_{k,g} - \theta_{base,g})

    with ``w`` on the simplex and the scale ``s`` fixed or learned. A scale below 1
    interpolates toward the base, above 1 extrapolates; with ``s = 1`` it is the soup.

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
        base: the model the task vectors ``theta_k - theta_base`` start from (an
            ``nn.Module`` or a state_dict of the template's architecture), held by
            reference like the ingredients: no copy, no gradient. ``None`` (default)
            merges the soup; a ``scale`` other than 1 then needs a base.
        scale: the scale ``s`` of the summed task vectors: a float (fixed), ``"learn"``
            (one learnable positive scalar, ``exp`` of the parameter ``log_scale``, (1,)) or
            ``"learn_per_group"`` (one learnable positive scale per group of the
            granularity, (G,)).
        scale_init: the starting value of a learned scale (> 0).

    ``forward(*args, **kwargs)`` runs ``net``, the template's copy, on the merged
    parameters. :meth:`merged_state_dict` and :meth:`merged_model` export a plain model.
    Memory: the base joins the ingredients in one fused combination of K + 1 tensors,
    ``(1 - s) theta_base + sum_k s w_k theta_k``, so task arithmetic, learned scale
    included, holds one merged copy like the soup.

    Example:
        >>> import torch, convexmix as cx
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> merge = cx.merge.LearnedMerge([a, b], init=[0.25, 0.75])
        >>> expected = 0.25 * a.weight + 0.75 * b.weight
        >>> torch.allclose(merge.merged_state_dict()["weight"], expected)
        True
        >>> base = torch.nn.Linear(2, 1)
        >>> ta = cx.merge.LearnedMerge([a, b], base=base, scale="learn", scale_init=0.5)
        >>> ta.scale.detach()
        tensor(0.5000)
        >>> tau = 0.5 * (a.weight - base.weight) + 0.5 * (b.weight - base.weight)
        >>> torch.allclose(ta.merged_state_dict()["weight"], base.weight + 0.5 * tau)
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
        base: nn.Module | StateDict | None = None,
        scale: Scale = 1.0,
        scale_init: float = 1.0,
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
        learn = _check_scale(scale, scale_init, base is not None)
        self.map = get_map(map).name
        self.granularity = granularity
        t_params = {n: p.detach() for n, p in template.named_parameters()}
        if not t_params:
            raise ConvexMixError("the template has no parameters to merge.")
        buffer_names = {n for n, _ in template.named_buffers()}
        states = [_state_of(m, f"models[{i}]", buffer_names) for i, m in enumerate(models)]
        for i, (params, _) in enumerate(states):
            _check_same(t_params, params, f"models[{i}]")
        base_params: dict[str, Tensor] | None = None
        if base is not None:
            base_params = _state_of(base, "base", buffer_names)[0]
            _check_same(t_params, base_params, "base")
        self.param_names = list(t_params)
        _check_dtypes(self.param_names, [p for p, _ in states], base_params)
        self.group_names, self._group_of = _group_names(self.param_names, granularity)
        # Plain attributes, not parameters or buffers: never trained, never saved.
        self.__dict__["_template"] = template
        self.__dict__["_ingredients"] = {
            n: [states[k][0][n] for k in range(len(models))] for n in self.param_names
        }
        self.__dict__["_base"] = base_params
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
        self._fixed_scale = 1.0 if learn is not None else float(scale)
        self.log_scale: nn.Parameter | None = None
        if learn is not None:
            # (1,) rather than 0-d for one scale: FSDP2 cannot shard 0-d parameters.
            per_group = learn == "learn_per_group" and granularity != "global"
            n_scales = len(self.group_names) if per_group else 1
            self._scale_per_group = per_group
            log_s = torch.full((n_scales,), math.log(scale_init), dtype=torch.get_default_dtype())
            self.log_scale = nn.Parameter(log_s)

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
            dtype = init.dtype if isinstance(init, Tensor) and init.is_floating_point() else None
            check_probabilities(p, 1.0, "init", dtype)
        free = get_map(self.map).inverse(p, -1, 1.0)
        return free.to(torch.get_default_dtype())

    @property
    def weights(self) -> Tensor:
        """The current weights: (K,) for "global", (G, K) otherwise (G groups)."""
        return get_map(self.map).forward(self.free, -1)

    @property
    def scale(self) -> Tensor:
        """The task-arithmetic scale: a 0-d tensor, or (G,) with ``"learn_per_group"``.

        Learned scales are ``exp(log_scale)`` (positive, with gradients); a fixed scale
        is a constant tensor (1 for the soup).
        """
        if self.log_scale is not None:
            s = self.log_scale.exp()
            return s if self._scale_per_group else s.reshape(())
        return torch.tensor(self._fixed_scale, dtype=self.free.dtype, device=self.free.device)

    @property
    def base_is_used(self) -> bool:
        """Whether the merge reads the base (a base and a scale that is not fixed at 1)."""
        return self.__dict__["_base"] is not None and (
            self.log_scale is not None or self._fixed_scale != 1.0
        )

    def _coefficients(self) -> Tensor:
        """The weights of the fused combination: ``w`` for the soup, else
        ``[s w_1, ..., s w_K, 1 - s]`` per group (the base is the last input)."""
        w = self.weights
        if not self.base_is_used:
            return w
        s = self.scale.to(w.dtype)
        if w.dim() == 2 and s.dim() == 1:  # one scale per group
            s = s[:, None]
        rest = (1 - s).expand(*w.shape[:-1], 1)
        return torch.cat([s * w, rest], dim=-1)

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
        w = self._cx_weights if self._cx_weights is not None else self._coefficients()
        row = w if w.dim() == 1 else w[self._group_of[i]]
        name = self.param_names[i]
        xs: list[Tensor] = self.__dict__["_ingredients"][name]
        if row.shape[-1] > len(xs):  # task arithmetic: the base is the last input
            xs = [*xs, self.__dict__["_base"][name]]
        out = convex_combination(row.to(xs[0].dtype), xs)
        if cache is not None:
            cache[i] = out
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._cx_cache, self._cx_weights = {}, self._coefficients()
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

    @classmethod
    def from_safetensors(
        cls,
        paths: Sequence[PathLike],
        template: nn.Module,
        *,
        base: PathLike | nn.Module | StateDict | None = None,
        **kwargs: Any,
    ) -> LearnedMerge:
        """Merge K ingredients memory-mapped from ``.safetensors`` files.

        Each file is opened with the ``safetensors`` package (``pip install
        'convexmix[merge]'``) and its tensors are views of a read-only memory map: the
        operating system pages them in while the merge reads them and may drop them
        again, so the ingredients cost file-backed page cache, not the process's own
        memory. A training step holds about one merged copy (plus the template), however
        many files there are.

        Args:
            paths: K ``.safetensors`` files holding the template's ``state_dict`` (its
                parameters; buffers are optional and used like a state_dict's).
            template: a module of the architecture; its parameters are never read.
            base: the task arithmetic base, as a path (memory-mapped too), a module or a
                state_dict.
            **kwargs: the other arguments of :class:`LearnedMerge` (``granularity``,
                ``scale``, ``init``, ...).

        Returns:
            A :class:`LearnedMerge` whose ingredients are the mapped tensors.

        Raises:
            ConvexMixError: a file that is missing or not a safetensors file.
            ShapeError: a missing or unexpected tensor, or a shape or dtype that differs
                from the template's; the message names the file and the tensor.

        Example:
            >>> import tempfile, os, torch, convexmix as cx
            >>> from safetensors.torch import save_file
            >>> tmp = tempfile.mkdtemp()
            >>> paths = []
            >>> for k in range(3):
            ...     paths.append(os.path.join(tmp, f"m{k}.safetensors"))
            ...     save_file(torch.nn.Linear(4, 2).state_dict(), paths[-1])
            >>> merge = cx.merge.LearnedMerge.from_safetensors(paths, torch.nn.Linear(4, 2))
            >>> merge(torch.randn(5, 4)).shape
            torch.Size([5, 2])
        """
        if isinstance(paths, (str, os.PathLike)) or len(paths) < 1:
            raise ConvexMixError(
                f"paths must be a sequence of K >= 1 .safetensors files; got {paths!r}."
            )
        if not isinstance(template, nn.Module):
            raise ConvexMixError(f"template must be an nn.Module; got {type(template).__name__}.")
        expected = dict(template.state_dict(keep_vars=True))
        params = {n for n, _ in template.named_parameters()}
        models = [_map_safetensors(p, expected, params) for p in paths]
        if isinstance(base, (str, os.PathLike)):
            base = _map_safetensors(base, expected, params)
        return cls(models, template=template, base=base, **kwargs)

    # ------------------------------------------------------------------ plumbing

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LearnedMerge:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        ingredients: dict[str, list[Tensor]] = self.__dict__["_ingredients"]
        for name, xs in ingredients.items():
            ingredients[name] = [fn(x) for x in xs]
        base: dict[str, Tensor] | None = self.__dict__["_base"]
        if base is not None:
            self.__dict__["_base"] = {name: fn(x) for name, x in base.items()}
        return self

    def extra_repr(self) -> str:
        return (
            f"n_models={self.n_models}, granularity={self.granularity!r}, "
            f"groups={len(self.group_names)}, map={self.map!r}, tensors={len(self.param_names)}"
            + (", base=True" if self.__dict__["_base"] is not None else "")
            + (f", scale={self._fixed_scale}" if self.log_scale is None else ", scale='learn'")
        )


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _map_safetensors(path: PathLike, expected: dict[str, Tensor], params: set[str]) -> StateDict:
    """The tensors of one ``.safetensors`` file as views of a memory map, checked against
    the template's state_dict ``expected`` (every parameter present; names, shapes and
    dtypes as in the template)."""
    try:
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - the [merge] extra is not installed
        raise ImportError(
            "LearnedMerge.from_safetensors needs the safetensors package: "
            "pip install 'convexmix[merge]'."
        ) from err
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ConvexMixError(f"{name!r}: no such file (expected a .safetensors file).")
    try:
        handle = safe_open(name, framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise ConvexMixError(f"{name!r} is not a readable safetensors file: {err}") from err
    with handle as f:
        keys = list(f.keys())
        missing = [n for n in expected if n in params and n not in keys]
        unexpected = [n for n in keys if n not in expected]
        if missing or unexpected:
            parts = [f"missing tensor(s) {missing}"] if missing else []
            parts += [f"unexpected tensor(s) {unexpected}"] if unexpected else []
            raise ShapeError(f"{name!r} does not match the template: " + ", ".join(parts) + ".")
        state: dict[str, Tensor] = {}
        for key in [k for k in expected if k in keys]:  # the template's order
            view = f.get_slice(key)
            shape, dtype = tuple(view.get_shape()), _ST_DTYPES.get(view.get_dtype())
            want = expected[key]
            if shape != tuple(want.shape):
                raise ShapeError(
                    f"{name!r}: tensor {key!r} has shape {shape}, but the template's is "
                    f"{tuple(want.shape)}."
                )
            if dtype != want.dtype:
                raise ShapeError(
                    f"{name!r}: tensor {key!r} has dtype {dtype or view.get_dtype()}, but "
                    f"the template's is {want.dtype}; convert the template or the file."
                )
            state[key] = f.get_tensor(key)
    return state


def entropy_loss(logits: Tensor) -> Tensor:
    r"""AdaMerging's label-free objective: the mean Shannon entropy of the predictions.

    .. math::

        \frac{1}{N} \sum_n H(\mathrm{softmax}(z_n)), \qquad
        H(p) = -\sum_c p_c \log p_c

    over the last dimension (the classes) of ``logits``, averaged over every other
    entry (N = ``logits.numel() / C``). Computed from ``log_softmax``: stable for any
    finite logits, and ``-inf`` logits (impossible classes) count as ``0 log 0 = 0`` with
    zero gradient, never NaN. Float16/bfloat16 logits are computed in float32.

    Args:
        logits: (..., C) unnormalised scores, floating point, C >= 1, at least one entry.

    Returns:
        A 0-d tensor of the logits' dtype (float32 for half precisions), differentiable.

    Example:
        >>> import torch, convexmix as cx
        >>> cx.merge.entropy_loss(torch.zeros(4, 2))  # uniform over 2 classes: log 2
        tensor(0.6931)
        >>> cx.merge.entropy_loss(torch.tensor([[30.0, 0.0]]))  # confident: about 0
        tensor(...e-12)
    """
    if not isinstance(logits, Tensor):
        raise ConvexMixError(f"logits must be a tensor; got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise ConvexMixError(f"logits must be floating point; got dtype {logits.dtype}.")
    if logits.dim() == 0 or logits.numel() == 0:
        raise ShapeError(
            f"logits must be (..., C) with C >= 1 and at least one row; got shape "
            f"{tuple(logits.shape)}."
        )
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    # 0 log 0 = 0: where p == 0 (a -inf logit), use log p = 0 so neither term is NaN.
    safe = torch.where(p > 0, log_p, torch.zeros((), dtype=z.dtype, device=z.device))
    return -(p * safe).sum(-1).mean()
