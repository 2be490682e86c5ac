"""Maps from R^K onto the simplex, along any ``dim``.

Every map takes ``dim=-1`` and the keyword-only ``mask=None`` (bool, True = present,
broadcastable to the input) and ``total=1.0`` (the sum of each output slice). Absent
entries are exactly 0; a slice with nothing present is all zeros with zero gradients.

>>> import torch, convexmix as cx
>>> x = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
>>> cx.functional.sparsemax(x, dim=-1)
tensor([[1.0000, 0.0000, 0.0000],
        [0.3333, 0.3333, 0.3333]])
"""

from convexmix.functional._bounded import project_l1_ball, project_sparse_simplex
from convexmix.functional._combine import convex_combination
from convexmix.functional._gumbel import gumbel_softmax, sample_topk
from convexmix.functional._project import project_simplex
from convexmix.functional._softmax import SOFTMAX_ZERO_EPS, softmax
from convexmix.functional._sparse import entmax, entmax15, sparsemax
from convexmix.functional._stick import stick_breaking, stick_breaking_inverse

__all__ = [
    "SOFTMAX_ZERO_EPS",
    "convex_combination",
    "entmax",
    "entmax15",
    "gumbel_softmax",
    "project_l1_ball",
    "project_simplex",
    "project_sparse_simplex",
    "sample_topk",
    "softmax",
    "sparsemax",
    "stick_breaking",
    "stick_breaking_inverse",
]
