"""Convex blend weights for K models' stored predictions: the exact optimum, and Caruana.

:func:`fit_weights` solves

    min_w  L(sum_k w_k P_k, y) + lam * ||w - 1/K||^2    subject to  w >= 0,  sum_k w_k = 1

exactly: a Newton method whose steps solve the quadratic model on the simplex with a
finite active-set method, with a backtracking line search on the exact objective. It
stops when the Frank-Wolfe gap ``w.g - min_k g_k``, an upper bound on the distance to the
optimal loss, is below ``tol``; models the optimum does not use get weights of exactly 0.
Log-loss only needs each model's probability of the true class, so the (K, N, C) input
is read once and the iterations work on a (K, N) matrix.

:func:`ensemble_selection` is Caruana et al.'s greedy forward selection with replacement
(ICML 2004), the baseline of auto-sklearn and AutoGluon: weights are multiples of 1/size.

>>> import torch, convexmix as cx
>>> y = torch.tensor([0, 1, 1, 0])
>>> good = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
>>> bad = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]])
>>> fit = cx.ensemble.fit_weights(torch.stack([good, bad]), y)
>>> fit.weights
tensor([1., 0.], dtype=torch.float64)
>>> round(fit.loss, 4)
0.3284
"""

from convexmix.ensemble._bootstrap import BootstrapResult, bootstrap
from convexmix.ensemble._compare import Comparison, compare
from convexmix.ensemble._fit import fit_weights
from convexmix.ensemble._result import EnsembleResult, load_weights
from convexmix.ensemble._selection import ensemble_selection

__all__ = [
    "BootstrapResult",
    "Comparison",
    "EnsembleResult",
    "bootstrap",
    "compare",
    "ensemble_selection",
    "fit_weights",
    "load_weights",
]

# Pickles name a class by its module: keep the public path, so that results saved before
# the split, and those saved now, load whatever the private layout.
for _cls in (BootstrapResult, Comparison, EnsembleResult):
    _cls.__module__ = __name__
del _cls
