"""One registration for the maps' custom ops: op, fake, vmap rule and autograd (private).

Each map's forward is a ``torch.library`` custom op (one opaque op for
``torch.compile(fullgraph=True)``) with a fake that gives the shape and dtype of its
first argument and a vmap rule. Around it sit two ``autograd.Function`` classes that
share one context and one backward (the map's vector-Jacobian product, from the saved
output):

* a staticmethod Function with ``setup_context`` (and ``generate_vmap_rule``), which both
  Dynamo (fullgraph) and torch.func (grad, vmap, jacrev) handle. ``register_autograd`` on
  the custom op itself is not usable with torch.func (pytorch/pytorch#179652);
* an old-style Function that runs the op's Python body directly, for plain eager calls:
  the custom op's dispatch and a ``setup_context`` Function's ``apply`` (which binds
  default arguments with ``inspect.signature``) cost ~10-100 us a call; this costs ~3.

:class:`MapOp` calls the first when traced, the second when a gradient is needed, and
the bare body otherwise.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from convexmix._validation import traced

__all__: list[str] = []

#: ``vjp(ctx, grad)``: the gradients of the first ``n_diff`` arguments (None where not needed).
Vjp = Callable[[Any, Tensor], tuple[Tensor | None, ...]]


_levels = threading.local()


def vmap_batch() -> tuple[int, int]:
    """``(levels, size)``: how many vmap rules of the maps run around the current call,
    and the product of their batch sizes. Inside them a map sees its batch dims first, so
    an error message subtracts ``levels`` from a dim and reduces a slice index modulo the
    slices of one example, to read as the eager call's message."""
    sizes: list[int] = getattr(_levels, "sizes", [])
    return len(sizes), math.prod(sizes)


def batch_rule(op: Any, n_tensors: int = 1) -> Any:
    """vmap rule for ``op(x, *tensors, dim, *scalars)`` along one non-negative ``dim``, with
    the ``n_tensors - 1`` tensors after ``x`` broadcast against it (bounds, alpha)."""

    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
        bdims = in_dims[:n_tensors]
        if n_tensors == 1 and bdims[0] is None:
            return op(*args), None
        x, bx = args[0], bdims[0]
        xb = x.unsqueeze(0).expand(info.batch_size, *x.shape) if bx is None else x.movedim(bx, 0)
        rest = [
            t.unsqueeze(0) if b is None else t.movedim(b, 0)
            for t, b in zip(args[1:n_tensors], bdims[1:], strict=True)
        ]
        sizes = _levels.__dict__.setdefault("sizes", [])
        sizes.append(info.batch_size)
        try:
            return op(xb, *rest, args[n_tensors] + 1, *args[n_tensors + 1 :]), 0
        finally:
            sizes.pop()

    return rule


def _like_first(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return x.new_empty(x.shape)


class MapOp:
    """A registered map: ``op`` (the custom op), ``function`` (the setup_context Function
    for compile and torch.func), ``eager`` (the plain Function) and ``impl`` (the body).
    Calling it runs ``function`` when traced, ``eager`` when one of the first ``n_diff``
    arguments needs a gradient, and ``impl`` itself otherwise."""

    __slots__ = ("eager", "function", "impl", "n_diff", "op")

    def __init__(
        self, op: Any, function: Any, eager: Any, impl: Callable[..., Tensor], n_diff: int
    ) -> None:
        self.op = op
        self.function = function
        self.eager = eager
        self.impl = impl
        self.n_diff = n_diff

    def __call__(self, *args: Any) -> Tensor:
        if traced():
            return cast(Tensor, self.function.apply(*args))
        if torch.is_grad_enabled() and any(a.requires_grad for a in args[: self.n_diff]):
            return cast(Tensor, self.eager.apply(*args))
        return self.impl(*args)


def register_map(
    name: str,
    impl: Callable[..., Tensor],
    vjp: Vjp,
    *,
    n_diff: int = 1,
    dim_arg: int = 1,
    saved: Sequence[int] = (),
    n_tensors: int = 1,
    eager_vjp: Vjp | None = None,
) -> MapOp:
    """Register ``impl(x, *tensors, dim, *scalars)`` as the custom op ``convexmix::<name>``
    with its fake and vmap rule, and build its two autograd Functions.

    Args:
        name: the op's name in the ``convexmix`` namespace.
        impl: the forward, with type annotations (they give the op's schema).
        vjp: ``vjp(ctx, grad)`` -> the gradients of the first ``n_diff`` arguments; the
            context has ``dim`` and ``saved_tensors`` = (output, *the ``saved`` inputs).
        n_diff: how many leading arguments can take a gradient.
        dim_arg: the position of ``dim`` among the arguments.
        saved: positions of the inputs saved for the backward, after the output.
        n_tensors: how many leading tensor arguments the vmap rule batches.
        eager_vjp: the backward of the plain eager Function only (a native kernel that
            traced or transformed gradients cannot run), ``vjp`` by default.
    """
    op = torch.library.custom_op(f"convexmix::{name}", mutates_args=())(impl)
    op.register_fake(_like_first)
    torch.library.register_vmap(op, batch_rule(op, n_tensors))
    signature = inspect.signature(impl)
    nones = (None,) * (len(signature.parameters) - n_diff)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.dim = inputs[dim_arg]
        ctx.save_for_backward(output, *(inputs[i] for i in saved))

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (*vjp(ctx, grad), *nones)

    def forward(*args: Any) -> Tensor:
        # through torch.ops: Dynamo cannot wrap a CustomOpDef held in a closure
        return cast(Tensor, getattr(torch.ops.convexmix, name)(*args))

    # Dynamo counts the parameters of a context-free forward to tell it from one with ctx
    forward.__signature__ = signature  # type: ignore[attr-defined]

    title = "".join(part.title() for part in name.split("_"))
    function = type(
        title,
        (torch.autograd.Function,),
        {
            "__doc__": f"Autograd for ``convexmix::{name}`` (setup_context: compile, torch.func).",
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )

    def eager_forward(ctx: Any, *args: Any) -> Tensor:
        y = impl(*args)
        setup_context(ctx, args, y)
        return y

    if eager_vjp is not None:
        eager_only = eager_vjp

        def eager_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
            return (*eager_only(ctx, grad), *nones)
    else:
        eager_backward = backward

    eager = type(
        title + "Eager",
        (torch.autograd.Function,),
        {
            "__doc__": f"Autograd for ``convexmix::{name}`` in plain eager calls.",
            "forward": staticmethod(eager_forward),
            "backward": staticmethod(eager_backward),
        },
    )
    return MapOp(op, function, eager, impl, n_diff)
