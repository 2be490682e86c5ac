"""The ingredients of a :class:`~convexmix.merge.LearnedMerge` (private): their
parameters and buffers as detached views, checked against the template, and memory-mapped
from ``.safetensors`` files."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from convexmix._optional import require
from convexmix.errors import ConvexMixError, ShapeError

__all__: list[str] = []

StateDict = Mapping[str, Tensor]
PathLike = str | os.PathLike[str]


def tied_names(template: nn.Module) -> dict[str, str]:
    """Second names of shared parameters: ``{alias: first name}`` (``out.weight`` ->
    ``emb.weight`` when ``out.weight is emb.weight``), in ``named_parameters`` order."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in template.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def state_of(
    model: nn.Module | StateDict, label: str, buffer_names: set[str], aliases: Mapping[str, str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters, buffers) of one ingredient (or the base), as detached views (no copies).

    A state_dict of a model with tied parameters holds each shared tensor under every
    name; the second names (``aliases``) are dropped after checking their shape."""
    if isinstance(model, nn.Module):
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        return params, buffers
    if isinstance(model, Mapping):
        tensors = {n: t.detach() for n, t in model.items() if isinstance(t, Tensor)}
        for alias, name in aliases.items():
            if alias in tensors and name not in tensors:  # saved under the second name only
                tensors[name] = tensors[alias]
            if alias in tensors and tensors[alias].shape != tensors[name].shape:
                raise ShapeError(
                    f"{label}: {alias!r} is tied to {name!r} in the template, but their "
                    f"shapes differ: {tuple(tensors[alias].shape)} and "
                    f"{tuple(tensors[name].shape)}."
                )
            tensors.pop(alias, None)
        params = {n: t for n, t in tensors.items() if n not in buffer_names}
        buffers = {n: t for n, t in tensors.items() if n in buffer_names}
        return params, buffers
    raise ConvexMixError(
        f"{label} must be an nn.Module or a state_dict; got {type(model).__name__}."
    )


def check_same(template: dict[str, Tensor], other: dict[str, Tensor], label: str) -> None:
    """The names and shapes of ``other`` are the template's."""
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


def check_dtypes(
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


#: safetensors' dtype names.
ST_DTYPES = {
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


def map_safetensors(
    path: PathLike, expected: dict[str, Tensor], params: set[str], aliases: Mapping[str, str]
) -> dict[str, Tensor]:
    """The tensors of one ``.safetensors`` file as views of a memory map, checked against
    the template's state_dict ``expected`` (every parameter present under one of its
    names; names, shapes and dtypes as in the template)."""
    safe_open = require(
        "safetensors", purpose="LearnedMerge.from_safetensors (reading .safetensors files)"
    ).safe_open
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ConvexMixError(f"{name!r}: no such file (expected a .safetensors file).")
    try:
        handle = safe_open(name, framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise ConvexMixError(f"{name!r} is not a readable safetensors file: {err}") from err
    with handle as f:
        keys = list(f.keys())
        present = set(keys) | {a for a, n in aliases.items() if n in keys}
        present |= {n for a, n in aliases.items() if a in keys}
        missing = [n for n in expected if n in params and n not in present]
        unexpected = [n for n in keys if n not in expected]
        if missing or unexpected:
            parts = [f"missing tensor(s) {missing}"] if missing else []
            parts += [f"unexpected tensor(s) {unexpected}"] if unexpected else []
            raise ShapeError(f"{name!r} does not match the template: " + ", ".join(parts) + ".")
        state: dict[str, Tensor] = {}
        for key in [k for k in expected if k in keys]:  # the template's order
            view = f.get_slice(key)
            shape, dtype = tuple(view.get_shape()), ST_DTYPES.get(view.get_dtype())
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


@torch.no_grad()
def init_buffers(net: nn.Module, parts: list[dict[str, Tensor]], policy: str) -> dict[str, Tensor]:
    """Set ``net``'s buffers to model 0's (``"first"``) or to the mean of the models'
    floating ones (``"mean"``), where the ingredients hold them (else the template's
    stay); return a copy of them, the state the merge starts from."""
    for name, b in net.named_buffers():
        have = [p[name] for p in parts if name in p]
        for t in have:
            if t.shape != b.shape:
                raise ShapeError(
                    f"buffer {name!r} has shape {tuple(t.shape)} in an ingredient, but "
                    f"{tuple(b.shape)} in the template."
                )
        if policy == "mean" and b.is_floating_point() and have and len(have) == len(parts):
            b.copy_(torch.stack([t.to(b.dtype) for t in have]).mean(0))
        elif name in parts[0]:
            b.copy_(parts[0][name])
    return {n: b.detach().clone() for n, b in net.named_buffers()}
