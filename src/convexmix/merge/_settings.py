"""The settings of a :class:`~convexmix.merge.LearnedMerge` (private): the scale and
the groups of its granularity, and the properties that stand for its merged tensors."""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import Tensor, nn

from convexmix._subclass import register_kind
from convexmix._validation import check_positive, is_number
from convexmix.errors import ConvexMixError, ConvexMixTypeError

__all__: list[str] = []

Granularity = Literal["global", "per_tensor", "per_module"]
Scale = float | Literal["learn", "learn_per_group"]


def check_scale(scale: object, scale_init: float, has_base: bool) -> str | None:
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


def group_names(names: list[str], granularity: str) -> tuple[list[str], list[int]]:
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
    """A skeleton module's parameter ``local``: the owning merge's tensor, merged when read."""

    def fget(module: nn.Module) -> Tensor:
        owner: Any = module.__dict__["_cx_merge"]  # the LearnedMerge
        out: Tensor = owner._tensor(module.__dict__["_cx_index"][local])
        return out

    return property(fget, doc=f"``{local}``: the merged tensor, computed when it is read.")


register_kind("Merged", lambda names: {name: _merged_property(name) for name in names})
