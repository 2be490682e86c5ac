"""``LearnedMerge``: learned soup and task arithmetic of K models (``cx.merge`` exports it)."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from convexmix._files import write_text
from convexmix._optional import require
from convexmix._subclass import subclass
from convexmix._validation import check_probabilities
from convexmix.errors import ConvexMixError, ConvexMixWarning, ShapeError
from convexmix.functional import convex_combination
from convexmix.functional._registry import check_deterministic
from convexmix.merge._checkpoints import DEFAULT_SHARD_SIZE
from convexmix.merge._export import learned_config, tensor_values
from convexmix.merge._files import atomic_folder, save_state_dict
from convexmix.merge._ingredients import (
    PathLike,
    StateDict,
    check_dtypes,
    check_same,
    init_buffers,
    map_safetensors,
    state_of,
    tied_names,
)
from convexmix.merge._settings import Granularity, Scale, check_scale, group_names
from convexmix.parametrize import Simplex

__all__ = ["LearnedMerge"]


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
        learn = check_scale(scale, scale_init, base is not None)
        # The layers' one route to the weights, with a deterministic map (no sampling mode).
        self.simplex: Simplex
        object.__setattr__(self, "simplex", Simplex(map, dim=-1))
        check_deterministic(self.simplex.spec)
        self.map: str = self.simplex.map
        self.granularity = granularity
        self.buffer_policy: str = buffers
        t_params = {n: p.detach() for n, p in template.named_parameters()}
        if not t_params:
            raise ConvexMixError("the template has no parameters to merge.")
        aliases = tied_names(template)
        buffer_names = {n for n, _ in template.named_buffers()}
        states = [state_of(m, f"models[{i}]", buffer_names, aliases) for i, m in enumerate(models)]
        for i, (params, _) in enumerate(states):
            check_same(t_params, params, f"models[{i}]")
        base_params: dict[str, Tensor] | None = None
        if base is not None:
            base_params = state_of(base, "base", buffer_names, aliases)[0]
            check_same(t_params, base_params, "base")
        self.param_names = list(t_params)
        check_dtypes(self.param_names, [p for p, _ in states], base_params)
        self.group_names, self._group_of = group_names(self.param_names, granularity)
        # Plain attributes, not parameters or buffers: never trained, never saved.
        self.__dict__["_template"] = template
        self.__dict__["_ingredients"] = {
            n: [states[k][0][n] for k in range(len(models))] for n in self.param_names
        }
        self.__dict__["_base"] = base_params
        self.__dict__["_aliases"] = aliases
        self.__dict__["_paths"] = None
        self.n_models = len(models)
        self.net = self._skeleton(template)
        self.__dict__["_start_buffers"] = init_buffers(self.net, [st[1] for st in states], buffers)
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
        free: Tensor = self.simplex.right_inverse(p)
        return free.to(torch.get_default_dtype())

    @property
    def weights(self) -> Tensor:
        """The current weights: (K,) for "global", (G, K) otherwise (G groups)."""
        out: Tensor = self.simplex.forward(self.free)
        return out

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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        if "simplex" not in self.__dict__:  # pickled before the weights went through Simplex
            object.__setattr__(self, "simplex", Simplex(self.map, dim=-1))
        self.__dict__.setdefault("buffer_policy", "first")

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged parameters and this module's buffers, as a template state_dict."""
        state = {n: self._tensor(i).clone() for i, n in enumerate(self.param_names)}
        for alias, name in self.__dict__.get("_aliases", {}).items():
            state[alias] = state[name]  # tied: one tensor under both names, as a tied model
        state.update({n: b.detach().clone() for n, b in self.net.named_buffers()})
        order = self.__dict__["_template"].state_dict(keep_vars=True)
        return {n: state[n] for n in order if n in state} | state

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
        aliases = tied_names(template)
        models = [map_safetensors(p, expected, params, aliases) for p in paths]
        base_path = os.fspath(base) if isinstance(base, (str, os.PathLike)) else None
        held = base if not isinstance(base, (str, os.PathLike)) else None
        if base_path is not None:
            held = map_safetensors(base_path, expected, params, aliases)
        merge = cls(models, template=template, base=held, **kwargs)
        merge.__dict__["_paths"] = ([os.fspath(p) for p in paths], base_path)
        return merge

    # ------------------------------------------------------------------ export

    def to_config(
        self,
        models: Sequence[PathLike] | None = None,
        base: PathLike | None = None,
        *,
        dtype: str | None = None,
    ) -> dict[str, Any]:
        """The mergekit configuration of what this merge learned, for
        :func:`~convexmix.merge.merge_checkpoints` (``convexmix merge``) or mergekit.

        The soup is ``merge_method: linear`` with ``normalize: false``; task arithmetic
        (a base and a scale other than 1) is ``task_arithmetic`` with ``lambda: 1`` and
        each group's scale folded into its weights, ``s_g w_{g,k}``. Per-tensor and
        per-module weights become ``filter`` rules (one per module, or per tensor); tied
        names get their tensor's weights; buffers get model 0's (weight 1 for model 0, 0
        for the others) or, with ``buffers="mean"``, the mean (integer buffers model 0's),
        as the merge started from: buffers updated in training (BatchNorm statistics)
        are written by :meth:`save_merged` only, and a warning says so.

        Args:
            models: the K ingredients' checkpoints (paths), in order; by default the
                files :meth:`from_safetensors` read.
            base: the base model's checkpoint (task arithmetic); by default the file
                :meth:`from_safetensors` read.
            dtype: the output dtype to configure (``"bfloat16"``, ...); None keeps the
                checkpoints' dtypes.

        Returns:
            A dict with ``merge_method``, ``models``, ``parameters`` (and
            ``base_model``, ``dtype``), ready for YAML.

        Example:
            >>> import torch, convexmix as cx
            >>> merge = cx.merge.LearnedMerge([torch.nn.Linear(2, 1)] * 2, init=[0.25, 0.75])
            >>> cfg = merge.to_config(["a.safetensors", "b.safetensors"])
            >>> cfg["merge_method"], [m["parameters"]["weight"] for m in cfg["models"]]
            ('linear', [0.25, 0.75])
        """
        paths = self.__dict__.get("_paths")
        if models is None:
            if paths is None:
                raise ConvexMixError(
                    "to_config needs the ingredients' checkpoints: pass models=[paths] "
                    "(and base=), or build the merge with LearnedMerge.from_safetensors."
                )
            models = paths[0]
        if base is None and paths is not None:
            base = paths[1]
        use_base = self.base_is_used
        if use_base and base is None:
            raise ConvexMixError("this merge is task arithmetic: pass base=, its checkpoint.")
        with torch.no_grad():
            coef = self._coefficients().detach().to("cpu", torch.float64)
        start: dict[str, Tensor] = self.__dict__.get("_start_buffers", {})
        changed = [
            n for n, b in self.net.named_buffers() if n in start and not torch.equal(start[n], b)
        ]
        if changed:
            warnings.warn(
                f"the merge's buffers {changed} changed since it was built (training updates "
                f"BatchNorm statistics); the configuration gives the ingredients' "
                f"({self.buffer_policy!r}); save_merged writes the current ones.",
                ConvexMixWarning,
                stacklevel=2,
            )
        values, compact = tensor_values(
            coef.reshape(-1, coef.shape[-1])[:, : self.n_models].tolist(),  # no base column
            self.param_names,
            self._group_of,
            self.group_names if self.granularity == "per_module" else None,
            self.__dict__.get("_aliases", {}),
            [(n, b.is_floating_point()) for n, b in self.net.named_buffers()],
            self.buffer_policy,
        )
        return learned_config(
            models=[os.fspath(m) for m in models],
            base=os.fspath(base) if use_base and base is not None else None,
            values=values,
            compact=compact,
            dtype=dtype,
        )

    def save_config(
        self,
        path: PathLike,
        models: Sequence[PathLike] | None = None,
        base: PathLike | None = None,
        *,
        dtype: str | None = None,
    ) -> Path:
        """Write :meth:`to_config` as YAML to ``path`` (atomically); return the path."""
        yaml = require("yaml", purpose="LearnedMerge.save_config (writing YAML)")
        config = self.to_config(models, base, dtype=dtype)
        return write_text(os.fspath(path), yaml.safe_dump(config, sort_keys=False))

    def save_merged(
        self, out: PathLike, *, shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False
    ) -> Path:
        """Write :meth:`merged_state_dict` to the folder ``out`` as safetensors, in the
        layout :func:`~convexmix.merge.merge_checkpoints` writes (``model.safetensors``,
        or shards of at most ``shard_size`` bytes with an index), all at once: ``out``
        must not exist or be empty (or ``force=True``). Tied tensors are written under
        each of their names. Returns the folder."""
        state = self.merged_state_dict()
        with atomic_folder(out, force=force) as folder:
            save_state_dict(state, folder, shard_size)
        return Path(out)

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
