"""Ready layers built on the simplex maps (``cx.SimplexWeights``; ``cx.nn`` re-exports them).

One module a layer: :class:`SimplexWeights`, :class:`WeightedSum` (and
:class:`LazyWeightedSum`), :class:`ScalarMix`.
"""

from convexmix.nn._scalar_mix import ScalarMix
from convexmix.nn._simplex_weights import SimplexWeights
from convexmix.nn._weighted_sum import LazyWeightedSum, WeightedSum

__all__ = ["LazyWeightedSum", "ScalarMix", "SimplexWeights", "WeightedSum"]

# Pickles name a class by its module: keep the public path, so that modules saved before
# the split, and those saved now, load whatever the private layout.
for _cls in (LazyWeightedSum, ScalarMix, SimplexWeights, WeightedSum):
    _cls.__module__ = __name__
del _cls

# The classes' ``__module__`` is this module, their methods' is the private one: doctest
# collects neither module's method examples on its own, so name them here.
__test__ = {"ScalarMix.from_allennlp": ScalarMix.from_allennlp}
