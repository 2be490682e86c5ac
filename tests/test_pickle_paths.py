"""Saved modules name classes and functions by their module paths: those paths are part of
the file format, so a module moved inside the package must not change them."""

from __future__ import annotations

import pickle
import pickletools

import pytest
import torch

import convexmix as cx

#: The convexmix modules that pickles of the layers and constrained modules may name.
STABLE = {
    "convexmix.nn",
    "convexmix.parametrize",
    "convexmix._subclass",
    "convexmix.functional._registry",
    "convexmix.functional._softmax",
    "convexmix.functional._sparse",
    "convexmix.functional._stick",
}


def _globals(obj: object) -> set[str]:
    """The ``module`` of every global a pickle of ``obj`` refers to."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(pickle.dumps(obj)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(strings[-2])
        elif op.name == "GLOBAL":
            found.add(str(arg).split(" ")[0])
    return {m for m in found if m.startswith("convexmix")}


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15", "stick_breaking"])
def test_saved_modules_name_only_stable_paths(name: str) -> None:
    modules = [
        cx.SimplexWeights(3, map=name),
        cx.WeightedSum(3, map=name),
        cx.ScalarMix(3),
        cx.simplex_(torch.nn.Linear(3, 1), "weight", map=name),
    ]
    for module in modules:
        assert _globals(module) <= STABLE, type(module).__name__
    assert "convexmix.nn" in _globals(cx.WeightedSum(2))
