"""Ready layers built on the simplex maps (``cx.SimplexWeights``; ``cx.nn`` re-exports them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from convexmix._validation import check_int, check_probabilities, compute_dtype
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional import convex_combination, project_simplex
from convexmix.parametrize import Simplex, check_capacity

__all__ = ["LazyWeightedSum", "ScalarMix", "SimplexWeights", "WeightedSum"]

Init = str | Sequence[float] | Tensor


def initial_weights(n: int, init: Init, total: float) -> Tensor | None:
    """Validated starting probabilities for ``n`` weights, or None for exact uniform.

    ``init`` is ``"uniform"``, ``"random"`` (uniform on the simplex: Dirichlet(1, ..., 1)),
    or probabilities of length ``n`` summing to ``total``; never logits.
    """
    if isinstance(init, str):
        if init == "uniform":
            return None
        if init == "random":
            e = torch.empty(n, dtype=torch.float64).exponential_()
            return (e / e.sum() * total).to(torch.get_default_dtype())
        raise ConvexMixError(
            f"init must be 'uniform', 'random' or a sequence of {n} probabilities; got {init!r}."
        )
    try:
        p = torch.as_tensor(init, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConvexMixError(
            f"init must be 'uniform', 'random' or a sequence of {n} probabilities; "
            f"got {type(init).__name__}."
        ) from err
    if p.shape != (n,):
        raise ShapeError(f"init must hold {n} probabilities; got shape {tuple(p.shape)}.")
    dtype = init.dtype if isinstance(init, Tensor) and init.is_floating_point() else None
    return check_probabilities(p, total, "init", dtype).to(torch.get_default_dtype())


class SimplexWeights(nn.Module):
    r"""``n`` learnable weights on the simplex: ``forward()`` returns them, shape ``(n,)``.

    The free parameter ``free`` (``n`` values, ``n - 1`` for stick-breaking) is mapped by
    ``map``; ``init`` is given as probabilities, never as logits.

    Args:
        n: the number of weights, >= 1.
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or ``"stick_breaking"``.
        init: ``"uniform"`` (exactly ``total / n``), ``"random"`` (uniform on the
            simplex, from torch's global generator) or ``n`` probabilities summing to ``total``.
        temperature: divides the free values before the map, > 0.
        total: the sum of the weights, > 0.
        upper: a cap on every weight (``map="softmax"``: the constrained softmax;
            ``"sparsemax"``: the capped projection); ``n * upper >= total``.

    Example:
        >>> import torch, convexmix as cx
        >>> w = cx.SimplexWeights(3, init=[0.5, 0.3, 0.2])
        >>> w()
        tensor([0.5000, 0.3000, 0.2000], grad_fn=<...>)
        >>> w(mask=torch.tensor([True, False, True]))  # renormalised over the present ones
        tensor([0.7143, 0.0000, 0.2857], grad_fn=<...>)
        >>> cx.SimplexWeights(4, map="sparsemax")
        SimplexWeights(n=4, map='sparsemax', total=1.0)
        >>> cx.SimplexWeights(4, init=[0.1, 0.2, 0.3, 0.4], upper=0.3)()  # projected start
        tensor([0.1500, 0.2500, 0.3000, 0.3000], grad_fn=<...>)
    """

    def __init__(
        self,
        n: int,
        *,
        map: str = "softmax",
        init: Init = "uniform",
        temperature: float = 1.0,
        total: float = 1.0,
        upper: float | None = None,
    ) -> None:
        super().__init__()
        self.n = check_int(n, "n")
        # A plain attribute, not a child module: it holds no tensors, and the repr of this
        # layer already says everything about it.
        self.simplex: Simplex
        object.__setattr__(
            self,
            "simplex",
            Simplex(map, dim=-1, total=total, temperature=temperature, upper=upper),
        )
        check_capacity(n, self.simplex.total, self.simplex.upper)
        p = initial_weights(n, init, self.simplex.total)
        if p is None:  # every map sends zeros to exactly uniform weights
            free = torch.zeros(self.simplex.free_shape((n,)))
        else:
            free = _right_inverse_quiet(self.simplex, p)
        self.free = nn.Parameter(free)

    @property
    def map(self) -> str:
        """The name of the map."""
        return self.simplex.map

    @property
    def total(self) -> float:
        """The sum of the weights."""
        return self.simplex.total

    def forward(self, mask: Tensor | None = None) -> Tensor:
        """The ``(n,)`` weights; with a bool ``mask`` (``(n,)`` or ``(B, n)``), renormalised
        over the present entries (the map restricted to them), absent ones exactly 0."""
        free: Tensor = self.free
        if mask is not None:
            if (
                not isinstance(mask, Tensor)
                or mask.dim() not in (1, 2)
                or mask.shape[-1:] != (self.n,)
            ):
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ShapeError(f"mask must have shape (n,) or (B, n) with n={self.n}; got {got}.")
            free = free.expand(*mask.shape[:-1], free.shape[-1])
        out: Tensor = self.simplex.forward(free, mask=mask)
        return out

    @property
    def weights(self) -> Tensor:
        """The current weights (same as ``self()``; keeps the graph)."""
        out: Tensor = self()
        return out

    def extra_repr(self) -> str:
        s = f"n={self.n}, map={self.map!r}, total={self.total}"
        if self.simplex.temperature != 1.0:
            s += f", temperature={self.simplex.temperature}"
        if self.simplex.upper is not None:
            s += f", upper={self.simplex.upper}"
        return s


def _right_inverse_quiet(simplex: Simplex, p: Tensor) -> Tensor:
    """Free values for the starting weights ``p``; under a cap, ``p`` is first projected
    onto the capped simplex (documented: ``init`` above the cap starts at its projection)."""
    if simplex.upper is not None:
        p = project_simplex(p, 0, total=simplex.total, upper=simplex.upper)
    return simplex.right_inverse(p)


# ------------------------------------------------------------------------ WeightedSum

Inputs = Sequence[Tensor] | Tensor | Mapping[str, Tensor]


def _count(inputs: object) -> int:
    """How many inputs a call carries (list/tuple length, size of dim 0, or dict size)."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ShapeError(
                "inputs as one tensor must have the n inputs along dim 0; got a 0-d tensor."
            )
        return int(inputs.shape[0])
    if isinstance(inputs, (list, tuple, Mapping)):
        return len(inputs)
    raise ConvexMixError(
        "inputs must be a list or tuple of tensors, one tensor with the inputs along dim 0, "
        f"or a dict keyed by source name; got {type(inputs).__name__}."
    )


def _check_init(init: Init, n: int, channels: int | None) -> Init:
    """Accept per-channel ``(n, C)`` probabilities as well as ``(n,)``."""
    if isinstance(init, str):
        return init
    p = torch.as_tensor(init, dtype=torch.float64)
    if channels is None and p.dim() == 2:
        raise ShapeError(
            f"init of shape {tuple(p.shape)} gives one simplex per channel: pass "
            f"channels={p.shape[1]} with it, or give {n} probabilities."
        )
    if channels is not None and p.dim() == 2:
        if p.shape != (n, channels):
            raise ShapeError(
                f"init must have shape ({n},) or ({n}, {channels}); got {tuple(p.shape)}."
            )
        for c in range(channels):  # each channel's column is one simplex
            initial_weights(n, p[:, c], 1.0)
    return init


class WeightedSum(nn.Module):
    r"""Fuse n inputs with learnable weights on the simplex: :math:`y = \sum_k w_k x_k\ (+\ b)`.

    ``forward(inputs, mask=None)`` takes a list/tuple of n same-shape tensors, one tensor
    with n along dim 0, or a dict keyed by ``sources`` names in which an absent key is a
    missing input. ``mask`` is a bool ``(n,)`` or ``(B, n)`` (B = dim 0 of the inputs):
    the weights are renormalised over each sample's present inputs (the map restricted to
    them: for softmax, the softmax over the present logits). A sample with no input
    present gives zeros (plus the bias), with finite gradients.

    Args:
        n: the number of inputs.
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"`` or ``"stick_breaking"``.
        init: ``"uniform"``, ``"random"`` or probabilities ``(n,)`` (or ``(n, C)``), never logits.
        bias: add an unconstrained learnable bias (a scalar, or ``(C,)`` with ``channels``).
        channels: ``C`` gives weights of shape ``(n, C)``: one simplex per channel of the
            last input dimension.
        sources: names of the n inputs, for dict inputs.
        temperature: divides the free values before the map.
        upper: a cap on every weight (``"softmax"`` and ``"sparsemax"`` maps); with a
            mask, the present inputs must still be able to carry the total.

    Example:
        >>> import torch, convexmix as cx
        >>> fuse = cx.WeightedSum(3, sources=["rgb", "depth", "audio"], init=[0.5, 0.3, 0.2])
        >>> x = {"rgb": torch.ones(2, 4), "audio": torch.zeros(2, 4)}  # depth is missing
        >>> fuse(x)  # weights renormalised over rgb and audio: 0.5/0.7 and 0.2/0.7
        tensor([[0.7143, 0.7143, 0.7143, 0.7143],
                [0.7143, 0.7143, 0.7143, 0.7143]], grad_fn=<...>)
        >>> fuse.weights
        tensor([0.5000, 0.3000, 0.2000], grad_fn=<...>)
    """

    free: nn.Parameter

    def __init__(
        self,
        n: int,
        *,
        map: str = "softmax",
        init: Init = "uniform",
        bias: bool = False,
        channels: int | None = None,
        sources: Sequence[str] | None = None,
        temperature: float = 1.0,
        upper: float | None = None,
    ) -> None:
        super().__init__()
        if channels is not None:
            check_int(channels, "channels", optional=True)
        self.channels = channels
        self.sources = self._check_sources(sources)
        self.init = init
        object.__setattr__(
            self, "simplex", Simplex(map, dim=0, temperature=temperature, upper=upper)
        )
        self.simplex: Simplex
        if bias:
            self.bias = nn.Parameter(torch.zeros(() if channels is None else (channels,)))
        else:
            self.register_parameter("bias", None)
        if n == 0 and isinstance(self, LazyModuleMixin):
            self.n = 0
            self.free = nn.parameter.UninitializedParameter()  # type: ignore[assignment]
            return
        check_int(n, "n")
        if self.sources is not None and len(self.sources) != n:
            raise ShapeError(f"sources must name the n={n} inputs; got {len(self.sources)} names.")
        self.n = n
        self.free = nn.Parameter(self._initial_free(n))

    @staticmethod
    def _check_sources(sources: Sequence[str] | None) -> list[str] | None:
        if sources is None:
            return None
        names = list(sources)
        if not all(isinstance(s, str) for s in names) or len(set(names)) != len(names):
            raise ConvexMixError(f"sources must be distinct strings; got {names!r}.")
        return names

    def _initial_free(self, n: int) -> Tensor:
        """Free values for n weights (per channel when ``channels`` is set) from ``init``."""
        shape = (n,) if self.channels is None else (n, self.channels)
        init = _check_init(self.init, n, self.channels)
        if not isinstance(init, str) and torch.as_tensor(init).dim() == 2:
            p: Tensor | None = torch.as_tensor(init, dtype=torch.get_default_dtype())
        else:
            p = initial_weights(n, init, 1.0)
            if p is not None and self.channels is not None:
                p = p[:, None].expand(shape)
        check_capacity(n, 1.0, self.simplex.upper)
        if p is None:  # exact uniform: every map sends zeros there
            return torch.zeros(self.simplex.free_shape(shape))
        return _right_inverse_quiet(self.simplex, p).contiguous()

    @property
    def map(self) -> str:
        """The name of the map."""
        return self.simplex.map

    @property
    def weights(self) -> Tensor:
        """The current weights, ``(n,)`` or ``(n, C)`` (with the graph, like ``forward``)."""
        out: Tensor = self.simplex.forward(self.free)
        return out

    def _split(self, inputs: Inputs) -> tuple[list[Tensor | None], Tensor | None]:
        """The n inputs in order (None where a dict lacks the key), and the (n,) presence."""
        if isinstance(inputs, Mapping):
            if self.sources is None:
                raise ConvexMixError(
                    "dict inputs need the source names: build the layer with sources=[...]; "
                    f"got keys {list(inputs)}."
                )
            unknown = [k for k in inputs if k not in self.sources]
            if unknown:
                raise ConvexMixError(
                    f"unknown source {unknown[0]!r}; the known sources are {self.sources}."
                )
            xs: list[Tensor | None] = [inputs.get(name) for name in self.sources]
            present = torch.tensor([x is not None for x in xs])
            return xs, None if bool(present.all()) else present
        if _count(inputs) != self.n:
            raise ShapeError(
                f"{type(self).__name__} expects {self.n} inputs; got {_count(inputs)}. For inputs "
                "that vary from call to call, name them all with sources=[...] and pass a dict "
                "(absent keys are missing), or pass mask=... (False = missing)."
            )
        return list(inputs.unbind(0) if isinstance(inputs, Tensor) else inputs), None

    def forward(self, inputs: Inputs, mask: Tensor | None = None) -> Tensor:
        """Fuse the inputs: ``(B, ..., [C])`` each, the output has the same shape."""
        if (
            mask is None
            and self.channels is None
            and inputs.__class__ in (list, tuple)
            and len(inputs) == self.n
        ):
            # The everyday call, with nothing to renormalise: the map, then the fused sum,
            # which checks the inputs (a few microseconds in all).
            s = self.simplex
            free = self.free if s.temperature == 1.0 else self.free / s.temperature
            out = convex_combination(s.spec.forward(free, 0, total=s.total), inputs)
            return out if self.bias is None else out + self.bias
        xs, given, mask, key_mask = self._check_inputs(inputs, mask)
        weights = self._weights_for(mask, given[0])
        if key_mask is not None:  # combine only the inputs that were given
            idx = [i for i, x in enumerate(xs) if x is not None]
            weights = weights[idx]
        out = convex_combination(weights, given)
        if self.bias is not None:
            out = out + self.bias
        return out

    def _check_inputs(
        self, inputs: Inputs, mask: Tensor | None
    ) -> tuple[list[Tensor | None], list[Tensor], Tensor | None, Tensor | None]:
        """Validate a call: (inputs in order, the given ones, the combined mask, key mask)."""
        xs, key_mask = self._split(inputs)
        given = [x for x in xs if x is not None]
        if not given:
            raise ConvexMixError("no input is present: at least one source must be given.")
        for i, x in enumerate(given):
            if not isinstance(x, Tensor):
                raise ConvexMixError(f"every input must be a tensor; got {type(x).__name__}.")
            if x.shape != given[0].shape:
                raise ShapeError(
                    "all inputs must have the same shape; got "
                    f"{[tuple(t.shape) for t in given]} (input {i} differs)."
                )
        like = given[0]
        if self.channels is not None and (like.dim() == 0 or like.shape[-1] != self.channels):
            raise ShapeError(
                f"channels={self.channels} needs inputs whose last dimension is {self.channels}; "
                f"got shape {tuple(like.shape)}."
            )
        return xs, given, self._combine_masks(mask, key_mask, like), key_mask

    def _combine_masks(
        self, mask: Tensor | None, key_mask: Tensor | None, like: Tensor
    ) -> Tensor | None:
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise ConvexMixError(f"mask must be a bool tensor (True = present); got {got}.")
            ok = mask.shape == (self.n,) or (
                mask.dim() == 2 and like.dim() >= 1 and mask.shape == (like.shape[0], self.n)
            )
            if not ok:
                batch = like.shape[0] if like.dim() else "B"
                raise ShapeError(
                    f"mask must have shape ({self.n},) or ({batch}, {self.n}) (batch, inputs); "
                    f"got {tuple(mask.shape)}."
                )
        if key_mask is None:
            return mask
        key_mask = key_mask.to(like.device)
        return key_mask if mask is None else mask & key_mask

    def _weights_for(self, mask: Tensor | None, like: Tensor) -> Tensor:
        """Weights shaped for ``convex_combination``:
        (n,), (n, C), (n, B, 1, ..., 1) or (n, B, 1, ..., C)."""
        if mask is None:
            return self.weights
        free = self.free
        if mask.dim() == 1:
            m = mask if self.channels is None else mask[:, None]
            out: Tensor = self.simplex.forward(free, mask=m)
            return out
        b = mask.shape[0]
        per_sample = mask.T  # (n, B)
        if self.channels is None:
            w: Tensor = self.simplex.forward(
                free[:, None].expand(free.shape[0], b), mask=per_sample
            )
            return w.reshape(self.n, b, *([1] * (like.dim() - 1)))
        w = self.simplex.forward(
            free[:, None, :].expand(free.shape[0], b, self.channels), mask=per_sample[..., None]
        )
        return w.reshape(self.n, b, *([1] * (like.dim() - 2)), self.channels)

    def extra_repr(self) -> str:
        parts = [f"n={self.n or None}", f"map={self.map!r}"]
        if self.channels is not None:
            parts.append(f"channels={self.channels}")
        if self.sources is not None:
            parts.append(f"sources={self.sources}")
        if self.bias is not None:
            parts.append("bias=True")
        if self.simplex.temperature != 1.0:
            parts.append(f"temperature={self.simplex.temperature}")
        if self.simplex.upper is not None:
            parts.append(f"upper={self.simplex.upper}")
        return ", ".join(parts)


class LazyWeightedSum(LazyModuleMixin, WeightedSum):
    """A :class:`WeightedSum` whose n is inferred at the first call.

    PyTorch's lazy-module rules: the weights are uninitialised until a first (dry) run,
    after which the module becomes a plain :class:`WeightedSum`; build the optimizer after
    that run. With dict inputs and no ``sources``, the first call's keys become the sources.
    A later call with another number of inputs is an error: for inputs that vary, use
    named ``sources`` with dicts, or ``mask``.

    Example:
        >>> import torch, convexmix as cx
        >>> fuse = cx.LazyWeightedSum()
        >>> _ = fuse([torch.ones(2), torch.zeros(2), torch.zeros(2)])  # dry run: n = 3
        >>> type(fuse).__name__, fuse.weights.shape
        ('WeightedSum', torch.Size([3]))
    """

    cls_to_become = WeightedSum
    free: nn.parameter.UninitializedParameter  # type: ignore[assignment]

    def __init__(
        self,
        *,
        map: str = "softmax",
        init: Init = "uniform",
        bias: bool = False,
        channels: int | None = None,
        sources: Sequence[str] | None = None,
        temperature: float = 1.0,
        upper: float | None = None,
    ) -> None:
        super().__init__(
            0,
            map=map,
            init=init,
            bias=bias,
            channels=channels,
            sources=sources,
            temperature=temperature,
            upper=upper,
        )

    def initialize_parameters(self, inputs: Inputs, mask: Tensor | None = None) -> None:
        """Materialise the weights for the count of the first call's inputs."""
        if not self.has_uninitialized_params():
            return
        sources = self.sources
        if isinstance(inputs, Mapping) and self.sources is None:
            self.sources = self._check_sources(list(inputs))
        n = len(self.sources) if self.sources is not None else _count(inputs)
        self.n = n
        try:  # a call that would fail leaves the module lazy, n unset
            self._check_inputs(inputs, mask)
        except Exception:
            self.n, self.sources = 0, sources
            raise
        with torch.no_grad():
            init = self._initial_free(n)
            self.free.materialize(init.shape)
            self.free.copy_(init)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Loading a state materialises the weights (torch's lazy-module convention): n
        comes from the loaded ``free`` tensor, whose shape must suit ``channels``."""
        free = state_dict.get(prefix + "free")
        if self.n == 0 and isinstance(free, Tensor):
            want = 1 if self.channels is None else 2
            if free.dim() != want or (self.channels is not None and free.shape[1] != self.channels):
                raise ShapeError(
                    f"the loaded weights ({prefix}free) have shape {tuple(free.shape)}; "
                    f"expected (n,) for channels=None or (n, C) for channels=C "
                    f"(this module: channels={self.channels})."
                )
            n = int(free.shape[0]) + self.simplex.spec.drop
            if self.sources is not None and len(self.sources) != n:
                raise ShapeError(
                    f"the loaded weights are for {n} inputs; sources names {len(self.sources)}."
                )
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.n == 0 and not self.has_uninitialized_params():
            self.n = int(self.free.shape[0]) + self.simplex.spec.drop


# --------------------------------------------------------------------------- ScalarMix


class _CenteredMix(torch.autograd.Function):
    r""":math:`\sum_k a_k (h_k - m_k)`, ``a`` and ``m`` of shape ``(K, *S)`` broadcasting
    against each ``h_k``: the layer-normalised mix. Each layer is centred before it is
    scaled, in float32 or wider, layer by layer into one accumulator (one scratch buffer,
    no normalised copy of any layer). Folding the means into one offset,
    ``sum_k a_k h_k - sum_k a_k m_k``, cancels: at layers of mean 1e3 and std 1e-2 it lost
    two digits in float32, and constant tokens (``a = 1e6``) gave 0.125 instead of 0.
    The backward recomputes ``h_k - m_k`` from the saved layers."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, m: Tensor, *xs: Tensor) -> Tensor:
        acc = torch.promote_types(compute_dtype(xs[0].dtype), a.dtype)
        out = torch.zeros(xs[0].shape, dtype=acc, device=xs[0].device)
        tmp = torch.empty_like(out)
        for k, x in enumerate(xs):
            out.addcmul_(torch.sub(x, m[k], out=tmp), a[k])
        ctx.save_for_backward(a, m, *xs)
        return out.to(xs[0].dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, m, *xs = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.to(a.dtype)
        ga = torch.zeros_like(a) if need[0] else None
        gm = torch.zeros_like(m) if need[1] else None
        gxs: list[Tensor | None] = []
        for k, x in enumerate(xs):
            gxs.append((g * a[k]).to(x.dtype) if need[2 + k] else None)
            if ga is not None:
                ga[k] = (g * (x - m[k])).sum_to_size(a[k].shape)
            if gm is not None:
                gm[k] = -(a[k] * g).sum_to_size(m[k].shape)
        return (ga, gm, *gxs)


LayerNorm = bool | str


class ScalarMix(nn.Module):
    r"""ELMo/AllenNLP scalar mix of layers: :math:`\gamma \sum_k s_k h_k`, ``s = softmax(w)``.

    Same output as AllenNLP's ``ScalarMix`` for the same parameters. ``layer_norm=True``
    (needs ``mask`` ``(B, T)``) normalises each layer with the mean and variance of its
    unmasked elements, ``(h - mean) / sqrt(var + 1e-12)``; ``layer_norm="token"``
    normalises each token over the last dimension. Each layer is centred, scaled and
    added into one accumulator (float32 for half inputs), so no normalised copy of any
    layer is made. An all-False mask gives zeros.

    Args:
        num_layers: the number of layers mixed.
        gamma: learn a scalar scale (initial value 1.0, or the float given); False: none.
        layer_norm: False, True (AllenNLP's masked per-layer norm) or ``"token"``.
        init: probabilities of the layers (never logits); None = uniform.
        trainable: False freezes the weights and gamma.
        layer_dropout: in training mode, drop each layer with this probability (masked
            before the softmax, then renormalised); never all of them.
        temperature: softmax temperature.

    Example:
        >>> import torch, convexmix as cx
        >>> mix = cx.ScalarMix(3, init=[0.2, 0.3, 0.5])
        >>> layers = [torch.full((2, 4), float(k)) for k in range(3)]  # e.g. hidden_states
        >>> mix(layers)[0]
        tensor([1.3000, 1.3000, 1.3000, 1.3000], grad_fn=<SelectBackward0>)
        >>> mix.weights
        tensor([0.2000, 0.3000, 0.5000], grad_fn=<...>)
    """

    def __init__(
        self,
        num_layers: int,
        *,
        gamma: bool | float = True,
        layer_norm: LayerNorm = False,
        init: Init | None = None,
        trainable: bool = True,
        layer_dropout: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if layer_norm not in (False, True, "token"):
            raise ConvexMixError(f"layer_norm must be False, True or 'token'; got {layer_norm!r}.")
        if not (isinstance(layer_dropout, (int, float)) and 0.0 <= layer_dropout < 1.0):
            raise ConvexMixError(f"layer_dropout must be in [0, 1); got {layer_dropout!r}.")
        self.mix = SimplexWeights(
            num_layers,
            map="softmax",
            init="uniform" if init is None else init,
            temperature=temperature,
        )
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.layer_dropout = float(layer_dropout)
        if gamma is False:
            self.register_parameter("gamma", None)
        else:
            value = 1.0 if gamma is True else float(gamma)
            self.gamma = nn.Parameter(torch.tensor(value))
        self.requires_grad_(trainable)

    @property
    def weights(self) -> Tensor:
        """The current layer weights ``s`` (without gamma), ``(num_layers,)``."""
        return self.mix.weights

    def forward(self, tensors: Sequence[Tensor] | Tensor, mask: Tensor | None = None) -> Tensor:
        """Mix ``num_layers`` same-shape tensors ``(B, T, D)`` (any shape without layer norm)."""
        count = _count(tensors)
        if count != self.num_layers:
            raise ShapeError(f"ScalarMix expects {self.num_layers} layers; got {count}.")
        xs = list(tensors.unbind(0) if isinstance(tensors, Tensor) else tensors)
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise ShapeError(f"all layers must have the same shape; got {sorted(shapes)}.")
        w = self.mix(mask=self._dropout_mask(xs[0].device))
        if self.gamma is not None:
            w = w * self.gamma
        if self.layer_norm is False:
            return convex_combination(w, xs)
        scale, offset = self._norm_stats(xs, mask)
        a = w.reshape(-1, *[1] * (scale.dim() - 1)).to(scale.dtype) * scale
        out: Tensor = _CenteredMix.apply(a, offset, *xs)  # type: ignore[no-untyped-call]
        return out

    def _dropout_mask(self, device: torch.device) -> Tensor | None:
        if not (self.training and self.layer_dropout > 0):
            return None
        keep = torch.rand(self.num_layers, device=device) >= self.layer_dropout
        if not bool(keep.any()):
            keep[torch.randint(self.num_layers, (), device=device)] = True
        return keep

    def _norm_stats(self, xs: list[Tensor], mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per layer ``1/std`` and ``mean``: scalars (AllenNLP) or per token ``(B, T, 1)``."""
        eps = 1e-12
        acc = compute_dtype(xs[0].dtype)  # 1e-12 and 1/std underflow/overflow in half
        if self.layer_norm == "token":
            stats = [torch.var_mean(x.to(acc), dim=-1, keepdim=True, correction=0) for x in xs]
            inv = torch.stack([(v + eps).rsqrt() for v, _ in stats])
            return inv, torch.stack([m for _, m in stats])
        x0 = xs[0]
        if mask is None or x0.dim() != 3 or mask.shape != x0.shape[:2]:
            got = None if mask is None else tuple(mask.shape)
            raise ShapeError(
                "layer_norm=True needs layers of shape (B, T, D) and mask of shape (B, T); "
                f"got layers {tuple(x0.shape)} and mask {got}."
            )
        m = mask.to(acc).unsqueeze(-1)
        count = m.sum() * x0.shape[-1]
        # An all-False mask: no element to normalise by; those layers count 0 (zeros out).
        anything = count > 0
        count = count.clamp_min(1)
        means, invs = [], []
        for x in xs:
            xm = x.to(acc) * m
            mean = xm.sum() / count
            centred = (xm - mean) * m
            # one correction step: the rounding of the first sum is taken back, so that a
            # constant layer has its exact mean (and gives zeros, not rounding / 1e-6)
            mean = mean + centred.sum() / count
            var = ((xm - mean) * m).square().sum() / count
            means.append(mean)
            invs.append(torch.where(anything, (var + eps).rsqrt(), 0.0))
        return torch.stack(invs), torch.stack(means)

    @classmethod
    def from_allennlp(cls, state_dict: Mapping[str, Tensor], **kwargs: object) -> ScalarMix:
        """Build from an AllenNLP ``ScalarMix`` state_dict (``scalar_parameters.{i}``, ``gamma``).

        Keys may carry a common prefix (e.g. ``"encoder.scalar_mix."``); ``kwargs`` go to
        the constructor (e.g. ``layer_norm=True``). The softmax of the AllenNLP scalars
        becomes ``init``, so the mix is the same.
        """
        import re

        found: dict[str, dict[int, Tensor]] = {}
        for key, value in state_dict.items():
            match = re.fullmatch(r"(.*)scalar_parameters\.(\d+)", key)
            if match:
                found.setdefault(match.group(1), {})[int(match.group(2))] = value
        if len(found) != 1:
            raise ConvexMixError(
                "expected the keys of one AllenNLP ScalarMix (scalar_parameters.0, ..., gamma); "
                f"found {len(found)} sets of scalar_parameters in keys {sorted(state_dict)[:8]}."
            )
        prefix, params = next(iter(found.items()))
        n = len(params)
        if sorted(params) != list(range(n)):
            raise ConvexMixError(
                f"scalar_parameters must be numbered 0..{n - 1}; got {sorted(params)}."
            )
        scalars = torch.cat([params[i].detach().reshape(1).double() for i in range(n)])
        gamma_key = prefix + "gamma"
        kwargs.setdefault("gamma", True)
        mix = cls(n, init=torch.softmax(scalars, 0).to(torch.get_default_dtype()), **kwargs)  # type: ignore[arg-type]
        if gamma_key in state_dict and mix.gamma is not None:
            with torch.no_grad():
                mix.gamma.copy_(state_dict[gamma_key].detach().reshape(()))
        return mix

    def extra_repr(self) -> str:
        parts = [f"num_layers={self.num_layers}", f"gamma={self.gamma is not None}"]
        if self.layer_norm is not False:
            parts.append(f"layer_norm={self.layer_norm!r}")
        if self.layer_dropout:
            parts.append(f"layer_dropout={self.layer_dropout}")
        return ", ".join(parts)
