"""convexmix: learnable weights that sum to one, for PyTorch.

>>> import torch, convexmix as cx
>>> w = cx.SimplexWeights(3)
>>> w()
tensor([0.3333, 0.3333, 0.3333], grad_fn=<...>)
"""

from convexmix import data, ensemble, functional, merge, optim
from convexmix._runtime import CacheInfo, cache_info, empty_cache, set_cache_limit
from convexmix._version import __version__
from convexmix.errors import (
    ConvexMixError,
    ConvexMixTypeError,
    ConvexMixWarning,
    InvalidProbabilitiesError,
    MissingExtraError,
    ShapeError,
    UnknownMapError,
)
from convexmix.functional import convex_combination
from convexmix.nn import LazyWeightedSum, ScalarMix, SimplexWeights, WeightedSum
from convexmix.parametrize import Simplex, remove_simplex_, simplex_
from convexmix.record import WeightRecorder

__all__ = [
    "CacheInfo",
    "ConvexMixError",
    "ConvexMixTypeError",
    "ConvexMixWarning",
    "InvalidProbabilitiesError",
    "LazyWeightedSum",
    "MissingExtraError",
    "ScalarMix",
    "ShapeError",
    "Simplex",
    "SimplexWeights",
    "UnknownMapError",
    "WeightRecorder",
    "WeightedSum",
    "__version__",
    "cache_info",
    "convex_combination",
    "data",
    "empty_cache",
    "ensemble",
    "functional",
    "merge",
    "optim",
    "remove_simplex_",
    "set_cache_limit",
    "simplex_",
]
