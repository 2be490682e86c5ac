"""Learned model merging: ``theta = sum_k w_k theta_k`` with learned convex weights,
and task arithmetic ``theta = theta_base + scale * sum_k w_k (theta_k - theta_base)``.

:class:`LearnedMerge` holds K models that share an architecture (the "ingredients") and
learns the weights of their convex combination, per model ("global"), per parameter
tensor ("per_tensor") or per module ("per_module", by the owning module's name). The
network runs as a parameter-free copy of the template whose parameters are properties:
each merged tensor is computed with the fused
:func:`~convexmix.functional.convex_combination` when the network reads it (once per
forward). Only the weights are parameters.

Memory: the ingredients are kept by reference (``detach()`` views of the given tensors):
no copies, no gradients, no ``.grad`` buffers. A training step holds the ingredients,
one merged copy of the parameters and the activations: merging a layer right before it
runs puts that merge's backward right after the layer's, so each parameter gradient is
consumed at once. The backward needs no gradient of any ingredient, only
``<grad, theta_k>`` per weight.

Task arithmetic (``base=``) folds the base into the same fused combination of K + 1
tensors, ``theta = (1 - scale) theta_base + sum_k scale w_k theta_k``, so it costs no
more memory than the soup. :func:`entropy_loss` is AdaMerging's label-free objective,
and :meth:`LearnedMerge.from_safetensors` memory-maps the ingredients from disk.

Checkpoints: :func:`merge_checkpoints` (the command ``convexmix merge``) applies a
mergekit configuration (``linear``, ``task_arithmetic``) to safetensors checkpoints,
streamed tensor by tensor; :meth:`LearnedMerge.to_config` writes what a merge learned in
that format, and :meth:`LearnedMerge.save_merged` writes the merged model.

>>> import torch, convexmix as cx
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
>>> merge = cx.merge.LearnedMerge(models, granularity="per_tensor")
>>> merge.weights.shape  # (n_tensors, K): weight, bias
torch.Size([2, 4])
>>> merge(torch.randn(5, 3)).shape
torch.Size([5, 2])
>>> [n for n, _ in merge.named_parameters()]  # only the mixing weights are learned
['free']
"""

from __future__ import annotations

from convexmix.merge._checkpoints import merge_checkpoints
from convexmix.merge._entropy import entropy_loss
from convexmix.merge._learned import LearnedMerge

__all__ = ["LearnedMerge", "entropy_loss", "merge_checkpoints"]

# Public names live here: pickles and the docs name ``convexmix.merge.LearnedMerge``.
for _obj in (LearnedMerge, entropy_loss, merge_checkpoints):
    _obj.__module__ = __name__
del _obj
