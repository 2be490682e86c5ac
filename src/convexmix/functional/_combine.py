"""``convex_combination``: sum_k weights[k] * inputs[k], fused (private module).

A call is checked (:func:`_everyday`, a few attribute reads for the usual call, else
:func:`_parse`, which says what is wrong), its path chosen once (:func:`_choose`), then
run (:func:`_apply`). Four paths, one answer:

* ``"stack"``: one ``stack`` and one matrix-vector product, for ``(K,)`` weights of
  tiny inputs, and of small ones from K = 3 on;
* ``"composite"``: ``mul`` then K-1 ``addcmul`` (a GEMV for one stacked tensor). Up to
  a few MiB an input, any fused call costs more in fixed overhead than it saves;
* ``"fused"``: ``_Fused``, a plain ``autograd.Function`` around the kernels of
  ``convexmix._kernels.combine`` (native C on CPU, Triton on CUDA, blocked ATen
  otherwise): about K reads and one write forward, one read of the output gradient plus
  K reads (and K writes for the inputs' gradients) backward, no K temporaries;
* ``"op"``: under ``torch.compile``, ``torch.library`` custom ops (opaque to
  ``torch.compile(fullgraph=True)``, no graph break) that run the same kernels.

Under torch.func transforms (grad, vmap, jacrev, jacfwd), TorchDispatchModes (make_fx,
FakeTensorMode, ...) and on tensor subclasses the composite code runs at every size; under
autocast it replaces the stacked contraction (whose GEMV autocast would lower). The
wrappers of the kernels live in :mod:`._combine_ops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor

from convexmix._kernels import combine
from convexmix._validation import (
    PLAIN,
    broadcasts_to,
    compute_dtype,
    normalize_dim,
    plain,
    traced,
)
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional._combine_ops import _combine_op, _combine_out_op, _Fused

__all__ = ["convex_combination"]


# ------------------------------------------------------------------- eager paths

#: Inputs of at most this many elements are stacked into one (..., K) tensor and
#: contracted with the (K,) weights: two ATen calls forward and a few backward whatever
#: K, where ``mul`` + ``addcmul`` cost K dispatches on a few elements.
STACK_MAX = 64
#: From 3 inputs on, inputs of at most this many elements are stacked as (K, N) and
#: contracted with ``matmul`` (``"stack"``): a copy of the inputs buys one
#: matrix-vector product forward and two backward, against 2K - 1 kernels each way.
#: Larger inputs spill the copy out of the caches.
STACK_MID_MAX = 1 << 17
#: Inputs of fewer elements than this run composite ATen code (``mul`` then
#: ``addcmul``); from here on the fused kernels, whose fixed costs (the Function, the
#: ctypes calls) no longer outweigh the memory traffic they save.
COMPOSITE_MAX = 1 << 21
#: Half-precision inputs (float16, bfloat16) take the fused kernels from this size: they
#: read each input once and accumulate in float32, where the composite code converts
#: each input to float32 (twice its bytes) and the sum back.
HALF_FUSED_MIN = 1 << 18

#: Forces one path for every eager call (tests and benchmarks): ``"stack"`` (the stacked
#: contraction, where the weights are ``(K,)`` of the inputs' dtype), ``"composite"``,
#: ``"fused"`` (the ``autograd.Function``) or ``"op"`` (the custom op that
#: ``torch.compile`` sees); None chooses by size.
_force: str | None = None
PATHS = ("stack", "composite", "fused", "op")


class _Call(NamedTuple):
    """A checked call (the recipe): the weights in their accumulation dtype, the K inputs
    as a list (``xs``) or as one tensor with K along ``d`` (``full``), one input's shape,
    number of elements, dtype and device type, and whether the weights are ``(K,)`` of
    the inputs' dtype (``vector``: the form the stacked contraction takes)."""

    w: Tensor
    xs: Sequence[Tensor] | None
    full: Tensor | None
    d: int
    k: int
    shape: torch.Size
    n: int
    dtype: torch.dtype
    device_type: str
    vector: bool

    def inputs(self) -> list[Tensor]:
        """The K inputs as a list."""
        return list(self.xs) if self.full is None else list(self.full.unbind(self.d))  # type: ignore[arg-type]

    def tensors(self) -> list[Tensor]:
        """The input tensors as given (K of them, or the one stacked tensor)."""
        return list(self.xs) if self.full is None else [self.full]  # type: ignore[arg-type]


_new_call = tuple.__new__  # a _Call without the keyword handling of its __new__


def _choose(call: _Call) -> str:
    """The path of an eager call, chosen once: one of :data:`PATHS`.

    Why these sizes (forward + backward against the seed loop, docs/benchmarks.md): up
    to 64 elements, and up to 2^17 from K = 3 on, fixed costs rule and the stacked
    contraction's two or three ATen calls beat K ``mul``/``addcmul`` whatever K (K = 8 on
    2^14-2^16 elements: 0.35-0.6x); up to 2^21 the composite code's passes stay mostly in
    the last-level cache while the fused kernels' fixed costs (the Function, its Python
    backward, the ctypes calls, the weights' partial sums) are not yet paid back (one
    thread, 2^17-2^18: fused 1.0-1.4x where composite is 0.6-0.95x); from 2^21 the fused
    kernels read each input once and win (0.15-0.6x); for half-precision inputs from
    2^18 (bfloat16, one thread: K = 2 at 2^18 fused 0.99x, composite 1.54x; K = 8 at
    2^16 0.77x against 1.24x), as the composite code converts them. Autocast would run the
    contraction's GEMV in its lower precision, so it takes the composite code, as do
    transforms, dispatch modes and subclasses (:func:`_native_ok`); ``torch.compile``
    the op. The contraction needs ``(K,)`` weights of the inputs' dtype.
    """
    if torch.compiler.is_compiling():
        return "op"
    w, _, _, _, k, _, n, dtype, device_type, vector = call
    path = _force
    if path is None:
        if (
            vector
            and (n <= STACK_MAX or (n <= STACK_MID_MAX and k >= 3))
            and not torch.is_autocast_enabled(device_type)
        ):
            return "stack"
        if n < (HALF_FUSED_MIN if dtype.itemsize == 2 else COMPOSITE_MAX):
            return "composite"
        path = "fused"
    elif path == "stack" and not vector:
        return "composite"
    if path == "fused" and not _native_ok([w, *call.tensors()]):
        return "composite"
    return path


def _contract(w: Tensor, xs: Sequence[Tensor], n: int) -> Tensor:
    """``sum_k w[k] * xs[k]`` for ``(K,)`` weights of the inputs' dtype and inputs of
    ``n`` elements, as one stack and one matrix-vector product (differentiable like
    :func:`_composite`). The weights' gradient is a float32 matrix-vector product for
    float32 inputs: a few ulps of ``sum |g x|`` (the seed loop's sums: about one)."""
    inputs = cast("list[Tensor]", xs)
    if n <= STACK_MAX:
        return torch.matmul(torch.stack(inputs, -1), w)
    return torch.matmul(w, torch.stack(inputs).view(len(inputs), n)).view(xs[0].shape)


def _composite(w: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """``sum_k w[k] * xs[k]`` in differentiable ATen ops: K kernels, no stack, any
    transform (torch.func, double backward) for free. ``w`` is in the accumulation dtype."""
    ws = w.unbind(0)
    x0 = xs[0]
    out = (x0 if x0.dtype == w.dtype else x0.to(w.dtype)) * ws[0]
    for k in range(1, len(xs)):
        out = torch.addcmul(out, xs[k], ws[k])
    return out if out.dtype == x0.dtype else out.to(x0.dtype)


def _composite_stacked(w: Tensor, x: Tensor, d: int) -> Tensor:
    """The same for one tensor with K along ``d``: a contraction (one GEMV for (K,)
    weights), no unbind."""
    if w.dim() == 1 and x.dtype == w.dtype and not torch.is_autocast_enabled(x.device.type):
        return cast(Tensor, torch.tensordot(w, x.movedim(d, 0), dims=1))
    return _composite(w, x.unbind(d))


def _native_ok(tensors: Sequence[Tensor]) -> bool:
    """Whether the fused kernels may run on ``tensors``: plain tensors (a wrapper subclass
    such as DTensor has no memory of its own to read), outside torch.func transforms and
    ``TorchDispatchMode``s (``make_fx`` would record a constant, ``FakeTensorMode`` has no
    values). Elsewhere the composite ATen code runs, which all of them dispatch."""
    return not traced() and plain(tensors)


def _fused(w: Tensor, xs: list[Tensor]) -> Tensor:
    """The fused kernels, through ``_Fused`` when a gradient is wanted."""
    if torch.is_grad_enabled() and (w.requires_grad or any(x.requires_grad for x in xs)):
        return cast(Tensor, _Fused.apply(w, *xs))  # type: ignore[no-untyped-call]
    x0 = xs[0]
    res = combine.empty(x0.shape, x0.dtype, x0.device)
    combine.forward(w, xs, res)
    return res


def _apply(path: str, call: _Call) -> Tensor:
    """Runs ``call`` on ``path`` (one of :data:`PATHS`, from :func:`_choose`)."""
    w, xs, full = call[0], call[1], call[2]
    if full is None and (path == "stack" or path == "composite"):
        assert xs is not None
        return _contract(w, xs, call[6]) if path == "stack" else _composite(w, xs)
    if path == "op":
        return cast(Tensor, _combine_op(w, call.inputs()))
    if path == "fused":
        return _fused(w, call.inputs())
    assert full is not None  # one tensor: its own contraction, no stack needed
    return _composite_stacked(w, full, call.d)


# ------------------------------------------------------------------------- public


def convex_combination(
    weights: Tensor,
    inputs: Tensor | Sequence[Tensor],
    *,
    dim: int = 0,
    out: Tensor | None = None,
) -> Tensor:
    r"""Fused weighted sum :math:`\sum_k w_k \, x_k` of K same-shape inputs.

    One pass: no ``torch.stack``, no K temporaries, one output (or ``out``). The weights
    are usually on the simplex (the output of a map), but any weights work (a ScalarMix
    gamma is folded in this way); they are not checked, so nothing synchronises.

    With ``(K,)`` weights, tiny inputs (at most 64 elements) and K >= 3 inputs of at most
    2^17 elements are stacked and contracted in one matrix-vector product (its weights'
    gradient: a few ulps of ``sum |g x|`` for float32); other calls of fewer than 2^21
    elements (2^18 for float16/bfloat16) run K ATen kernels (``mul``, then
    ``addcmul``), which at these sizes cost less than a fused call; larger ones the
    fused kernels. Under ``torch.compile`` the
    call is one opaque custom op (no graph break); under torch.func transforms
    (``grad``, ``vmap``, ``jacrev``, ``jacfwd``) it is composite ATen code, and double
    backward works everywhere but inside a compiled graph.

    Args:
        weights: ``(K,)``, or ``(K, *S)`` with ``S`` broadcasting to an input's shape
            (per-channel weights ``(K, C)``, per-sample weights ``(K, B, 1, ..., 1)``).
        inputs: a list/tuple of K tensors of one shape, dtype and device (any strides),
            or one tensor with K along ``dim``.
        dim: the dimension of K when ``inputs`` is one tensor.
        out: a preallocated output of the inputs' shape and dtype, to reuse a buffer
            (no autograd through ``out=``). It may share memory with the inputs (e.g.
            ``out=inputs[1]``): the sum then goes through a temporary buffer first.

    Returns:
        Tensor of the inputs' shape and dtype; float16/bfloat16 accumulate in float32.
        Gradients flow to the weights and the inputs, only to those that need them.
        CPU outputs and input gradients of 4 MiB or more reuse memory that earlier ones
        freed (convexmix's output cache, ``CONVEXMIX_OUTPUT_CACHE_MB``; see the guide),
        so their storage cannot grow: ``resize_`` to more elements raises.

    Example:
        >>> import torch, convexmix as cx
        >>> xs = [torch.ones(2, 3), torch.zeros(2, 3)]
        >>> cx.functional.convex_combination(torch.tensor([0.25, 0.75]), xs)
        tensor([[0.2500, 0.2500, 0.2500],
                [0.2500, 0.2500, 0.2500]])
        >>> per_channel = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])  # (K, C)
        >>> cx.functional.convex_combination(per_channel, xs)
        tensor([[1.0000, 0.0000, 0.5000],
                [1.0000, 0.0000, 0.5000]])
    """
    if out is None:
        call = _everyday(weights, inputs)
        if call is None:
            call = _parse(weights, inputs, dim)
        return _apply(_choose(call), call)
    call = _parse(weights, inputs, dim)
    return _into(call.w, call.inputs(), out, call.shape, torch.compiler.is_compiling())


def _everyday(weights: Tensor, xs: object) -> _Call | None:
    """The everyday call, checked in a few attribute reads: a list/tuple of K >= 1 CPU
    tensors of one shape and dtype (float32 or float64) and ``(K,)`` weights of that
    dtype, all dense; nothing to convert. None sends anything else to :func:`_parse`
    (which says what is wrong)."""
    if xs.__class__ not in (list, tuple) or weights.__class__ not in PLAIN:
        return None
    w = weights
    if not (w.is_cpu and w.layout is _STRIDED):
        return None
    dtype, k = w.dtype, len(xs)
    if not (dtype is _F32 or dtype is _F64) or k == 0 or w.shape != (k,):
        return None
    x0 = xs[0]
    if x0.__class__ not in PLAIN:
        return None
    shape = x0.shape
    for x in xs:
        if not (
            x.__class__ in PLAIN
            and x.dtype is dtype
            and x.is_cpu
            and x.layout is _STRIDED
            and x.shape == shape
        ):
            return None
    return _new_call(_Call, (w, xs, None, 0, k, shape, shape.numel(), dtype, "cpu", True))


_STRIDED, _F32, _F64 = torch.strided, torch.float32, torch.float64


def _parse(weights: object, inputs: object, dim: int) -> _Call:
    """The full checks of a call (each failure says what was expected and what was
    given), and the weights in their accumulation dtype."""
    full: Tensor | None = None
    xs: list[Tensor] | None = None
    d = 0
    if isinstance(inputs, Tensor):
        full = inputs
        d = normalize_dim(full, dim, "inputs")
        k, shape = full.shape[d], full.shape[:d] + full.shape[d + 1 :]
        dtype, device = full.dtype, full.device
        if k == 0:
            raise ShapeError(
                f"inputs of shape {tuple(full.shape)} hold no input along dim={dim}; "
                "expected K >= 1."
            )
        if full.layout != torch.strided:
            raise ConvexMixError(
                f"inputs must be dense (strided) tensors; got layout {full.layout}."
            )
    else:
        xs = _check_list(inputs)
        x0 = xs[0]
        k, shape, dtype, device = len(xs), x0.shape, x0.dtype, x0.device
    if not isinstance(weights, Tensor):
        raise ConvexMixError(f"weights must be a tensor; got {type(weights).__name__}.")
    if weights.layout != torch.strided or weights.dtype.is_complex:
        raise ConvexMixError(
            "weights must be a dense real tensor; got "
            f"{weights.dtype if weights.dtype.is_complex else weights.layout}."
        )
    wshape = weights.shape
    if len(wshape) == 0 or wshape[0] != k:
        raise ShapeError(
            f"weights must have shape (K, ...) with K={k} inputs; got {tuple(wshape)}."
        )
    if len(wshape) > 1 and not broadcasts_to(wshape[1:], shape):
        raise ShapeError(
            f"weights of shape {tuple(wshape)} do not broadcast against inputs of shape "
            f"{tuple(shape)}: the trailing shape {tuple(wshape[1:])} must broadcast to it."
        )
    if not dtype.is_floating_point:
        raise ConvexMixError(f"inputs must be floating point; got dtype {dtype}.")
    if weights.device != device:
        raise ConvexMixError(
            f"weights are on {weights.device} but the inputs on {device}; move one of them."
        )
    wdtype = weights.dtype
    if wdtype == dtype and (dtype == torch.float32 or dtype == torch.float64):
        w = weights
    else:
        acc = torch.promote_types(compute_dtype(dtype), wdtype)
        w = weights if wdtype == acc else weights.to(acc)
    vector = w.dim() == 1 and w.dtype == dtype
    return _Call(w, xs, full, d, k, shape, shape.numel(), dtype, device.type, vector)


def _check_list(inputs: object) -> list[Tensor]:
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ConvexMixError(
            "inputs must be a non-empty list/tuple of tensors or one tensor with K along dim; "
            f"got {type(inputs).__name__}{' (empty)' if isinstance(inputs, (list, tuple)) else ''}."
        )
    xs = list(inputs)
    x0 = xs[0]
    if isinstance(x0, Tensor):
        shape, dtype, device = x0.shape, x0.dtype, x0.device
        if all(
            isinstance(x, Tensor)
            and x.shape == shape
            and x.dtype == dtype
            and x.device == device
            and x.layout == torch.strided
            for x in xs
        ):
            return xs
    for i, x in enumerate(xs):  # something is off: say what
        if not isinstance(x, Tensor):
            raise ConvexMixError(f"inputs[{i}] must be a tensor; got {type(x).__name__}.")
        if x.layout != torch.strided:
            raise ConvexMixError(
                f"inputs must be dense (strided) tensors; got layout {x.layout} for inputs[{i}]."
            )
    if any(x.shape != x0.shape for x in xs):
        raise ShapeError(
            f"all inputs must have the same shape; got {[tuple(t.shape) for t in xs]}."
        )
    if any(x.dtype != x0.dtype for x in xs):
        raise ConvexMixError(
            f"all inputs must have the same dtype; got {sorted({str(t.dtype) for t in xs})}."
        )
    raise ConvexMixError(
        f"all inputs must be on one device; got {sorted({str(t.device) for t in xs})}."
    )


def _into(
    w: Tensor,
    xs: list[Tensor],
    out: Tensor,
    shape: torch.Size,
    compiling: bool,
) -> Tensor:
    """The ``out=`` form: checked, no autograd, the fused kernel writes ``out``."""
    dtype = xs[0].dtype
    if not isinstance(out, Tensor) or out.shape != shape or out.dtype != dtype:
        got = (tuple(out.shape), out.dtype) if isinstance(out, Tensor) else type(out).__name__
        raise ShapeError(f"out must have shape {tuple(shape)} and dtype {dtype}; got {got}.")
    if torch.is_grad_enabled() and (w.requires_grad or any(x.requires_grad for x in xs)):
        raise ConvexMixError(
            "out= does not support autograd: drop out= or run under torch.no_grad()."
        )
    if torch._debug_has_internal_overlap(out) == 1:
        raise ConvexMixError(
            "out must not have overlapping elements (e.g. an expand()ed view); "
            "pass a fresh or contiguous tensor."
        )
    if not compiling and _force != "op" and not _native_ok([w, out, *xs]):
        with torch.no_grad():  # a subclass or a dispatch mode: ATen code it can see
            return out.copy_(_composite(w, xs))
    if not compiling and _overlaps(out, [*xs, w]):
        # out shares memory with an input: the kernel would read what it has already
        # written. Combine into a buffer, then copy.
        res = combine.empty(shape, dtype, out.device)
        combine.forward(w.detach(), xs, res)
        out.copy_(res)
        return out
    if compiling or _force == "op":
        _combine_out_op(w.detach(), xs, out)
    else:
        combine.forward(w.detach(), xs, out)
    return out


def _span(t: Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` that a tensor's elements occupy (strides >= 0)."""
    start = t.data_ptr()
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent + 1) * t.element_size()


def _overlaps(out: Tensor, others: Sequence[Tensor]) -> bool:
    """Whether ``out`` shares memory with any of ``others`` (same storage, byte ranges that
    intersect). Pointer arithmetic only: no device sync."""
    if out.numel() == 0:
        return False
    base = out.untyped_storage().data_ptr()
    lo, hi = _span(out)
    for t in others:
        if t.device == out.device and t.untyped_storage().data_ptr() == base:
            a, b = _span(t)
            if a < hi and lo < b:
                return True
    return False
