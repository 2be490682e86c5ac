"""``WeightedSum`` and ``LazyWeightedSum``: fuse n inputs with learnable weights on the
simplex (private module; ``cx.nn`` and ``cx`` export them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from convexmix._validation import check_int
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional import convex_combination
from convexmix.nn._init import Init, initial_free, initial_weights
from convexmix.nn._inputs import Inputs, count_inputs
from convexmix.parametrize import Simplex, check_capacity

if TYPE_CHECKING:
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LazyWeightedSum", "WeightedSum"]


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


def _add_bias(out: Tensor, bias: Tensor) -> Tensor:
    """``out + bias`` in the inputs' dtype (a ``(C,)`` float32 bias would promote bfloat16
    inputs' mix to float32 where a scalar one does not)."""
    return out + (bias if bias.dtype == out.dtype else bias.to(out.dtype))


class WeightedSumOptions(TypedDict, total=False):
    """The keyword arguments of :class:`WeightedSum` (what :class:`LazyWeightedSum` takes)."""

    map: str
    init: Init
    bias: bool
    channels: int | None
    sources: Sequence[str] | None
    temperature: float
    upper: float | None


class WeightedSum(nn.Module):
    r"""Fuse n inputs with learnable weights on the simplex: :math:`y = \sum_k w_k x_k\ (+\ b)`.

    ``forward(inputs, mask=None)`` takes a list/tuple of n same-shape tensors, one tensor
    with n along dim 0, or a dict keyed by ``sources`` names in which an absent key is a
    missing input. ``mask`` is a bool ``(n,)`` or ``(B, n)`` (B = dim 0 of the inputs):
    the weights are renormalised over each sample's present inputs (the map restricted to
    them: for softmax, the softmax over the present logits). A sample with no input
    present gives zeros (plus the bias), with finite gradients.

    Learning rate (docs/convergence.md): with Adam, softmax weights reached the optimum at
    0.01 to 1, sparsemax only at 3e-3 to 0.03; faster, a sparse weight can be lost for good.

    Args:
        n: the number of inputs.
        map: ``"softmax"``, ``"sparsemax"``, ``"entmax15"``, ``"stick_breaking"``, or a
            sampling map, ``"gumbel"`` (a one-hot sample per call in training, the most
            probable entry in ``eval()``) or ``"gumbel_soft"`` (a relaxed sample; the
            probabilities in ``eval()``), whose ``temperature`` is the sampler's tau.
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
        self._build(n)

    def _build(self, n: int) -> None:
        """Set ``n`` and the free parameter (:class:`LazyWeightedSum` defers them)."""
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
        return initial_free(self.simplex, p).contiguous()

    def train(self, mode: bool = True) -> Self:
        """Training or evaluation mode, for this layer and its map (a sampling map draws
        in training and is deterministic in evaluation)."""
        super().train(mode)
        self.simplex.train(mode)  # a plain attribute, so nn.Module.train misses it
        return self

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
        if isinstance(inputs, (list, tuple)) or (isinstance(inputs, Tensor) and inputs.dim()):
            given: list[Tensor | None] = list(
                inputs.unbind(0) if isinstance(inputs, Tensor) else inputs
            )
        else:  # count_inputs raises the error that says what inputs may be
            given = [None] * count_inputs(inputs)
        if len(given) != self.n:
            raise ShapeError(
                f"{type(self).__name__} expects {self.n} inputs; got {len(given)}. "
                "For inputs that vary from call to call, name them all with sources=[...] and "
                "pass a dict (absent keys are missing), or pass mask=... (False = missing)."
            )
        return given, None

    def forward(self, inputs: Inputs, mask: Tensor | None = None) -> Tensor:
        """Fuse the inputs: ``(B, ..., [C])`` each, the output has the same shape.

        One route whatever the call: the weights come from the layer's
        :class:`~convexmix.parametrize.Simplex` (map, temperature, ``upper``, and the
        mask when there is one), the mix from :func:`~convexmix.functional.convex_combination`.
        The everyday call (a list or tuple of the n inputs, no mask, no channels) skips
        only the checks that convex_combination makes itself.
        """
        if (
            mask is None
            and self.channels is None
            and inputs.__class__ in (list, tuple)
            and len(inputs) == self.n
        ):
            params = self._parameters  # a dict read: nn.Module.__getattr__ costs more
            free: Tensor = params["free"]  # type: ignore[assignment]
            out = convex_combination(self.simplex.forward(free), inputs)
            bias = params["bias"]
            return out if bias is None else _add_bias(out, bias)
        return self._forward_checked(inputs, mask)

    def _forward_checked(self, inputs: Inputs, mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` with every check and every form of input (dicts, stacked
        tensors, masks, channels); the everyday call's result, to rounding."""
        xs, given, mask, key_mask = self._check_inputs(inputs, mask)
        weights = self._weights_for(mask, given[0])
        if key_mask is not None:  # combine only the inputs that were given
            idx = [i for i, x in enumerate(xs) if x is not None]
            weights = weights[idx]
        out = convex_combination(weights, given)
        return out if self.bias is None else _add_bias(out, self.bias)

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

    def __init__(self, **options: Unpack[WeightedSumOptions]) -> None:
        super().__init__(0, **options)

    def _build(self, n: int) -> None:
        """No inputs seen yet: ``n`` is 0 and the weights wait for the first call."""
        self.n = 0
        self.free = nn.parameter.UninitializedParameter()

    def initialize_parameters(self, inputs: Inputs, mask: Tensor | None = None) -> None:
        """Materialise the weights for the count of the first call's inputs."""
        if not self.has_uninitialized_params():
            return
        sources = self.sources
        if isinstance(inputs, Mapping) and self.sources is None:
            self.sources = self._check_sources(list(inputs))
        n = len(self.sources) if self.sources is not None else count_inputs(inputs)
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
            n = self.simplex.weights_shape(free.shape)[0]
            if self.sources is not None and len(self.sources) != n:
                raise ShapeError(
                    f"the loaded weights are for {n} inputs; sources names {len(self.sources)}."
                )
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.n == 0 and not self.has_uninitialized_params():
            self.n = self.simplex.weights_shape(self.free.shape)[0]
