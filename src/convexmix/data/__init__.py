"""Training-data mixtures: domain weights learned online, and a sampler that follows them.

:class:`MixtureWeights` holds weights on the simplex over named data domains and updates
them from per-domain losses (DoReMi, exponentiated gradient, EXP3), identically on every
rank under ``torch.distributed``. :class:`MixtureSampler` is a
``torch.utils.data.Sampler`` of indices into the domains' ``ConcatDataset`` whose draws
follow the weights in effect at each draw, deterministic from a seed, disjoint across
ranks and resumable mid-epoch.

>>> import torch
>>> from torch.utils.data import ConcatDataset, DataLoader, TensorDataset
>>> from convexmix.data import MixtureSampler, MixtureWeights
>>> domains = {"easy": TensorDataset(torch.zeros(80)), "hard": TensorDataset(torch.ones(20))}
>>> weights = MixtureWeights(list(domains), update="doremi", lr=1.0, smoothing=1e-3)
>>> sampler = MixtureSampler(domains, weights, num_samples=64, seed=0)
>>> loader = DataLoader(ConcatDataset(domains.values()), batch_size=16, sampler=sampler)
>>> for (x,) in loader:
...     weights.step({"easy": 0.1, "hard": 2.0}, {"easy": 0.1, "hard": 1.0})
>>> weights.weights
tensor([0.0187, 0.9813], dtype=torch.float64)
"""

from convexmix.data._sampler import MixtureSampler
from convexmix.data._weights import MixtureWeights

__all__ = ["MixtureSampler", "MixtureWeights"]
