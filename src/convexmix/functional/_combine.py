"""``convex_combination``: sum_k weights[k] * inputs[k], fused (private module).

Four ways to run, one answer:

* eager, tiny (inputs of at most ``STACK_MAX`` elements, ``(K,)`` weights), or small
  with K >= 3 (at most ``STACK_MID_MAX``): one ``stack`` and one matrix-vector product;
* eager, small (inputs of fewer than ``COMPOSITE_MAX`` elements): composite ATen code,
  ``mul`` then K-1 ``addcmul`` (a GEMV for one stacked tensor). At these sizes any fused call
  costs more in fixed overhead than it saves in memory traffic;
* eager, larger: ``_Fused``, a plain ``autograd.Function`` around the kernels of
  ``convexmix._kernels.combine`` (native C on CPU, Triton on CUDA, blocked ATen
  otherwise): about K reads and one write forward, one read of the output gradient plus
  K reads (and K writes for the inputs' gradients) backward, no K temporaries. Its
  backward is the fused kernel, or differentiable ATen ops when a graph of the backward
  is wanted (double backward);
* under ``torch.compile``: ``torch.library`` custom ops (opaque to
  ``torch.compile(fullgraph=True)``, no graph break) that run the same kernels.

Under torch.func transforms (grad, vmap, jacrev, jacfwd), TorchDispatchModes (make_fx,
FakeTensorMode, ...) and on tensor subclasses the composite code runs at every size; under
autocast it replaces the stacked contraction (whose GEMV autocast would lower).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from convexmix._kernels import combine
from convexmix._validation import broadcasts_to, compute_dtype, normalize_dim, plain, traced
from convexmix.errors import ConvexMixError, ShapeError

__all__ = ["convex_combination"]


# ------------------------------------------------------------------------ custom ops


@torch.library.custom_op("convexmix::combine", mutates_args=())
def _combine_op(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    out = combine.empty(inputs[0].shape, inputs[0].dtype, inputs[0].device)
    combine.forward(weights, inputs, out)
    return out


@_combine_op.register_fake
def _(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    return inputs[0].new_empty(inputs[0].shape)


@torch.library.custom_op("convexmix::combine_out", mutates_args=("out",))
def _combine_out_op(weights: Tensor, inputs: list[Tensor], out: Tensor) -> None:
    combine.forward(weights, inputs, out)


@_combine_out_op.register_fake
def _(weights: Tensor, inputs: list[Tensor], out: Tensor) -> None:
    return None


# One backward op per need (weights, inputs, both), each with a fixed output structure and
# no flags. The inputs' gradients are computed for all inputs or none; when only some
# inputs need one, the others are dropped.


@torch.library.custom_op("convexmix::combine_grad_w", mutates_args=())
def _grad_w_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> Tensor:
    grad_w = combine.backward(grad, weights, inputs, True, [False] * len(inputs)).weights
    assert grad_w is not None
    return grad_w


@_grad_w_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> Tensor:
    return weights.new_empty(weights.shape)


@torch.library.custom_op("convexmix::combine_grad_x", mutates_args=())
def _grad_x_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return combine.backward(grad, weights, inputs, False, [True] * len(inputs)).inputs


@_grad_x_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    return [x.new_empty(x.shape) for x in inputs]


@torch.library.custom_op("convexmix::combine_grad_wx", mutates_args=())
def _grad_wx_op(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    grad_w, grad_xs = combine.backward(grad, weights, inputs, True, [True] * len(inputs))
    assert grad_w is not None
    return grad_w, grad_xs


@_grad_wx_op.register_fake
def _(grad: Tensor, weights: Tensor, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    return weights.new_empty(weights.shape), [x.new_empty(x.shape) for x in inputs]


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    weights, xs = inputs
    ctx.save_for_backward(weights, *xs)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
    """One pass over the output gradient for whatever is needed. Inputs that need no
    gradient get None (when only some do, the others' are computed and dropped)."""
    weights, *xs = ctx.saved_tensors
    need_w = bool(ctx.needs_input_grad[0])
    flags = ctx.needs_input_grad[1]  # one flag per input (eager), or one bool (AOTAutograd)
    need_x = (
        [bool(n) for n in flags] if isinstance(flags, (list, tuple)) else [bool(flags)] * len(xs)
    )
    grad = grad.contiguous()
    grad_w: Tensor | None = None
    grad_xs: list[Tensor] | None = None
    if need_w and any(need_x):
        grad_w, grad_xs = _grad_wx_op(grad, weights, xs)
    elif need_w:
        grad_w = _grad_w_op(grad, weights, xs)
    elif any(need_x):
        grad_xs = _grad_x_op(grad, weights, xs)
    gx: list[Tensor | None] = [None] * len(xs)
    if grad_xs is not None:
        gx = [g if n else None for g, n in zip(grad_xs, need_x, strict=True)]
    return grad_w, gx


# register_autograd (not an autograd.Function): Dynamo mis-binds a varargs Function that
# passes its tensors on as a list. torch.func transforms are not supported on this op.
_combine_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------- eager paths

#: Inputs of fewer elements than this run composite ATen code in eager calls (``mul``
#: then ``addcmul``): up to a few MiB an input, the composite code's passes mostly hit
#: the last-level cache, and the fused kernels' fixed costs (the Function, the ctypes
#: calls, fresh gradient buffers) outweigh the memory traffic they save, whatever K;
#: from 2^21 elements on the fused kernels win (figures in docs/benchmarks.md).
COMPOSITE_MAX = 1 << 21

#: Forces one path for every eager call (tests and benchmarks): ``"stack"`` (the stacked
#: contraction, where the weights are ``(K,)`` of the inputs' dtype), ``"composite"``,
#: ``"fused"`` (the ``autograd.Function``) or ``"op"`` (the custom op that
#: ``torch.compile`` sees); None chooses by size.
_force: str | None = None


#: Inputs of at most this many elements are stacked into one (..., K) tensor and
#: contracted with the (K,) weights (:func:`_contract`): two ATen calls forward and a
#: few backward whatever K, where ``mul`` + ``addcmul`` cost K dispatches on a few
#: elements (forward + backward of 32 inputs of 64 elements: 130 us against 430 us).
STACK_MAX = 64
#: From 3 inputs on, inputs of at most this many elements are stacked too, as (K, N): a
#: copy of the inputs buys one matrix-vector product forward and two backward, against
#: 2K - 1 kernels each way (forward + backward against the seed loop, 2 threads: K = 8 on
#: (64, 256) 0.6x and on (64, 1024) 0.5x, where ``mul`` + ``addcmul`` are 1.0x). Larger
#: inputs spill the copy out of the caches (K = 8 on (256, 1024): 1.2x).
STACK_MID_MAX = 1 << 17


def _stacks(n: int, k: int) -> bool:
    """Whether K inputs of n elements each take :func:`_contract` (unless autocast is on:
    it would run the matrix-vector product, and return its result, in its lower
    precision, where ``mul``/``addcmul`` keep the inputs' dtype, as in the seed loop)."""
    return n <= STACK_MAX or (k >= 3 and n <= STACK_MID_MAX)


def _contract(w: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """``sum_k w[k] * xs[k]`` for ``(K,)`` weights of the inputs' dtype, as one stack and
    one matrix-vector product (differentiable like :func:`_composite`). The weights'
    gradient is a float32 matrix-vector product for float32 inputs: a few ulps of
    ``sum |g x|`` (the seed loop's sums: about one)."""
    x0 = xs[0]
    inputs = cast("list[Tensor]", xs)
    if x0.numel() <= STACK_MAX:
        return torch.matmul(torch.stack(inputs, -1), w)
    return torch.matmul(w, torch.stack(inputs).view(len(inputs), x0.numel())).view(x0.shape)


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


def _grads(
    grad: Tensor, w: Tensor, xs: Sequence[Tensor], need_w: bool, need_x: Sequence[bool]
) -> tuple[Tensor | None, list[Tensor | None]]:
    """The backward in differentiable ATen ops (double backward, torch.func)."""
    grad_w = None
    if need_w:
        g = grad.to(w.dtype)
        grad_w = torch.stack([(g * x).sum_to_size(w.shape[1:]) for x in xs])
    ws = w.unbind(0)
    gx: list[Tensor | None] = [
        (grad * ws[k]).to(xs[k].dtype) if n else None for k, n in enumerate(need_x)
    ]
    return grad_w, gx


class _Fused(torch.autograd.Function):
    """Eager autograd for the fused kernels: a plain ``autograd.Function`` (a few
    microseconds a call, against ~100 for the custom op's Python autograd). The backward
    runs the fused kernel, or differentiable ATen ops when a graph of it is wanted
    (``create_graph=True``), so double backward works."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, *xs: Tensor) -> Tensor:
        # ctx in forward, not setup_context: Function.apply binds the default arguments
        # of a setup_context Function with inspect.signature (~10 us a call). torch.func
        # transforms never reach this class (they run the composite code).
        x0 = xs[0]
        out = combine.empty(x0.shape, x0.dtype, x0.device)
        combine.forward(w, list(xs), out)
        ctx.save_for_backward(w, *xs)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w, *xs = ctx.saved_tensors
        need_w, *need_x = ctx.needs_input_grad
        if torch.is_grad_enabled():
            grad_w, gx = _grads(grad, w, xs, need_w, need_x)
            return (grad_w, *gx)
        grad_w, grad_xs = combine.backward(grad.contiguous(), w, xs, need_w, need_x)
        it = iter(grad_xs)
        return (grad_w, *(next(it) if n else None for n in need_x))


def _native_ok(tensors: Sequence[Tensor]) -> bool:
    """Whether the fused kernels may run on ``tensors``: plain tensors (a wrapper subclass
    such as DTensor has no memory of its own to read), outside torch.func transforms and
    ``TorchDispatchMode``s (``make_fx`` would record a constant, ``FakeTensorMode`` has no
    values). Elsewhere the composite ATen code runs, which all of them dispatch."""
    return not traced() and plain(tensors)


# ------------------------------------------------------------------------- public


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
    elements run K ATen kernels (``mul``, then ``addcmul``), which at these sizes cost
    less than a fused call; larger ones the fused kernels. Under ``torch.compile`` the
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
    if (
        out is None
        and _force is None
        and inputs.__class__ in (list, tuple)
        and _everyday(weights, inputs)
        and not torch.compiler.is_compiling()
    ):  # the usual call, checked in a few attribute reads: nothing to convert
        n = inputs[0].numel()
        if _stacks(n, len(inputs)) and not torch.is_autocast_enabled("cpu"):
            return _contract(weights, inputs)
        if n < COMPOSITE_MAX or not _native_ok([weights, *inputs]):
            return _composite(weights, inputs)
        return _fused(weights, list(inputs))
    stacked = isinstance(inputs, Tensor)
    if stacked:
        d = normalize_dim(inputs, dim, "inputs")  # type: ignore[arg-type]
        xs: list[Tensor] = []
        full: Tensor = inputs  # type: ignore[assignment]
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
    compiling = torch.compiler.is_compiling()
    if out is not None:
        if stacked:
            xs = list(full.unbind(d))
        return _into(w, xs, out, shape, dtype, compiling)
    if compiling or _force == "op":
        if stacked:
            xs = list(full.unbind(d))
        return cast(Tensor, _combine_op(w, xs))
    path = _force
    if path is None:
        n = shape.numel()
        stack = _stacks(n, k) and not torch.is_autocast_enabled(device.type)
        path = "stack" if stack else "composite" if n < COMPOSITE_MAX else "fused"
    if path == "fused" and not _native_ok([w, full] if stacked else [w, *xs]):
        path = "composite"
    if stacked:
        if path != "fused":
            return _composite_stacked(w, full, d)
    elif path == "stack" and w.dim() == 1 and w.dtype == dtype:
        return _contract(w, xs)
    elif path != "fused":
        return _composite(w, xs)
    return _fused(w, list(full.unbind(d)) if stacked else xs)


def _everyday(weights: object, xs: Sequence[object]) -> bool:
    """Whether a call is the everyday one: K >= 1 CPU tensors of one shape and dtype
    (float32 or float64) and ``(K,)`` weights of that dtype, all dense. A few attribute
    reads; anything else goes through the full checks (which say what is wrong)."""
    if not (isinstance(weights, Tensor) and weights.is_cpu and weights.layout is torch.strided):
        return False
    dtype, k = weights.dtype, len(xs)
    if not (dtype is torch.float32 or dtype is torch.float64) or k == 0 or weights.shape != (k,):
        return False
    shape = xs[0].shape if isinstance(xs[0], Tensor) else None
    for x in xs:
        if not (
            isinstance(x, Tensor)
            and x.dtype is dtype
            and x.is_cpu
            and x.layout is torch.strided
            and x.shape == shape
        ):
            return False
    return True


def _fused(w: Tensor, xs: list[Tensor]) -> Tensor:
    """The fused kernels, through ``_Fused`` when a gradient is wanted."""
    if torch.is_grad_enabled() and (w.requires_grad or any(x.requires_grad for x in xs)):
        return cast(Tensor, _Fused.apply(w, *xs))  # type: ignore[no-untyped-call]
    x0 = xs[0]
    res = combine.empty(x0.shape, x0.dtype, x0.device)
    combine.forward(w, xs, res)
    return res


def _into(
    w: Tensor,
    xs: list[Tensor],
    out: Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    compiling: bool,
) -> Tensor:
    """The ``out=`` form: checked, no autograd, the fused kernel writes ``out``."""
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
