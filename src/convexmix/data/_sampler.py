"""A sampler whose domain proportions follow (changing) mixture weights (private; the face
is :mod:`convexmix.data`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Sampler

from convexmix.data._reduce import group_rank_world
from convexmix.data._weights import MixtureWeights
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError

__all__ = ["MixtureSampler"]

_MASK64 = (1 << 64) - 1
_UNIFORMS = 1 << 16  # positions per block of uniform numbers (fixed by the seed alone)
_FIRST_CHUNK = 256  # draws mapped at once after a weight change; doubles up to _MAX_CHUNK
_MAX_CHUNK = 1 << 16


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (the key of a counter-based stream)."""
    h = 0
    for p in parts:
        h = _splitmix(h ^ (p & _MASK64))
    return h >> 1


class MixtureSampler(Sampler[int]):
    r"""Indices into a ``ConcatDataset``-style layout whose domains follow mixture weights.

    Domain :math:`i` holds the global indices ``offset[i] .. offset[i] + size[i] - 1`` (the
    layout of ``torch.utils.data.ConcatDataset(datasets)``). Each draw picks a domain with
    the probabilities in effect at that draw, then an example of that domain: uniformly
    (``replacement=True``) or the next one of a random permutation of the domain, a new
    permutation each time the domain is used up (``replacement=False``).

    **Changing weights.** ``weights`` may be a :class:`MixtureWeights`: each draw uses its
    current weights. Draw :math:`p` of an epoch owns two uniform numbers
    :math:`(u_p, v_p)`, fixed by (seed, epoch, rank, p) alone; its domain is the inverse CDF
    of the weights in effect at that draw at :math:`u_p`, its example
    :math:`\lfloor v_p n_d \rfloor` (or the next of the domain's pass). The sampler maps the
    uniforms to indices in vectorised chunks, checks the weights'
    :attr:`~MixtureWeights.version` before every index it yields and maps the rest anew
    when they changed, so a step of the weights takes effect at the very next index, and
    changing the weights never shifts the random numbers of later draws.

    **DataLoader.** The sampler runs in the main process, also with ``num_workers > 0``:
    workers only receive the index batches. A :meth:`MixtureWeights.step` in the training
    loop (the main process) is therefore seen by the sampler, but a ``DataLoader`` with
    workers draws ahead: it keeps ``prefetch_factor * num_workers`` batches of indices in
    flight, so a weight change reaches the batches drawn after those (with
    ``num_workers=0`` the next batch). Weights stepped inside a worker process (in a
    dataset or ``collate_fn``) never reach the sampler.

    **Ranks.** Each rank draws from its own shard of every domain (the examples
    ``j`` with ``j % world_size == rank``, as ``DistributedSampler`` splits), with its own
    random stream, so the ranks' indices are disjoint. Give every rank the same weights
    (a :class:`MixtureWeights` stepped on all ranks is bit-identical across them).

    **Determinism and resuming.** The stream is a function of ``seed``, the epoch
    (:meth:`set_epoch`), the rank and the weights in effect at each draw.
    :meth:`state_dict` records the epoch, the position and (``replacement=False``) how
    far each domain's passes have got; after :meth:`load_state_dict` (with the weights
    restored too) the next iteration continues with the identical indices. With a
    ``DataLoader`` that draws ahead, the sampler's position is ahead of the batches the
    loop has consumed (see above).

    Args:
        domains: the domain sizes (ints), the datasets themselves (each ``len()`` is its
            size), a ``ConcatDataset``, or a mapping ``{name: size or dataset}`` (ordered
            as the ``MixtureWeights``' domains when ``weights`` is one).
        weights: a :class:`MixtureWeights` (live), or fixed probabilities (K,).
        num_samples: indices per epoch on this rank; default ``ceil(total / world_size)``.
        seed: the seed of every random stream.
        rank: this rank; default the torch.distributed rank (0 when not initialised).
        world_size: the number of ranks; default the torch.distributed world size (or 1).
        replacement: draw examples within a domain with replacement (default) or from
            reshuffled passes without.

    Example:
        >>> import torch
        >>> from convexmix.data import MixtureSampler
        >>> s = MixtureSampler([100, 10], torch.tensor([0.5, 0.5]), num_samples=6, seed=0)
        >>> idx = list(s)
        >>> len(idx), s.domain_of(torch.tensor(idx)).tolist()
        (6, [0, 0, 1, 1, 1, 0])
    """

    def __init__(
        self,
        domains: Sequence[int] | Sequence[Sized] | Mapping[Any, int | Sized] | ConcatDataset[Any],
        weights: MixtureWeights | Tensor | Sequence[float],
        *,
        num_samples: int | None = None,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        replacement: bool = True,
    ) -> None:
        sizes = _sizes(domains, weights)
        k = len(sizes)
        if isinstance(weights, MixtureWeights):
            if len(weights.domains) != k:
                raise ShapeError(
                    f"weights has {len(weights.domains)} domains; got {k} domain sizes."
                )
            self._live: MixtureWeights | None = weights
            self._fixed: list[float] = []
        else:
            self._live = None
            self._fixed = _fixed_probs(weights, k).tolist()
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConvexMixTypeError(f"seed must be an int; got {seed!r}.")
        if (rank is None) != (world_size is None):
            d_rank, d_world = group_rank_world(None)
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        elif rank is None or world_size is None:
            rank, world_size = group_rank_world(None)
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ConvexMixError(
                f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}."
            )
        small = [i for i, n in enumerate(sizes) if n < world_size]
        if small:
            raise ConvexMixError(
                f"every domain needs at least world_size={world_size} examples (one per rank); "
                f"domains {small} have sizes {[sizes[i] for i in small]}."
            )
        total = sum(sizes)
        if num_samples is None:
            num_samples = math.ceil(total / world_size)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
            raise ConvexMixError(f"num_samples must be an int >= 0; got {num_samples!r}.")
        self.sizes = sizes
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.replacement = bool(replacement)
        self.epoch = 0
        self._offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
        self._ends = self._offsets + torch.tensor(sizes, dtype=torch.int64)
        # examples of each domain on this rank: j = rank, rank + world, ...
        self._local = torch.tensor(
            [(n - rank + world_size - 1) // world_size for n in sizes], dtype=torch.int64
        )
        self._local_f = self._local.to(torch.float64)
        self._base = self._offsets + rank
        self._gen = torch.Generator()
        self._perms: dict[int, tuple[int, Tensor]] = {}
        self._pending: dict[str, Any] | None = None
        self._state = self._fresh_state()

    # ------------------------------------------------------------------ helpers
    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Use the random streams of ``epoch`` from the next iteration on."""
        self.epoch = int(epoch)

    def domain_of(self, indices: Tensor) -> Tensor:
        """The domain (0..K-1) of each global index, a tensor of the same shape (int64)."""
        return torch.searchsorted(self._ends, torch.as_tensor(indices), right=True)

    def probabilities(self) -> Tensor:
        """The domain probabilities the next draw uses, (K,) float64."""
        return torch.tensor(self._current(), dtype=torch.float64)

    def _current(self) -> list[float]:
        # MixtureWeights replaces (never mutates) its list of weights: safe to keep
        return self._live._weights if self._live is not None else self._fixed

    def _fresh_state(self) -> dict[str, Any]:
        k = len(self.sizes)
        return {
            "epoch": self.epoch,
            "position": 0,
            "chunk_start": 0,
            "cursors": torch.zeros(k, dtype=torch.int64),  # at chunk_start
            "dom": torch.empty(0, dtype=torch.int64),  # the chunk's domains
        }

    # ------------------------------------------------------------------ drawing
    def _uniforms(self, epoch: int, block: int) -> Tensor:
        """The (2, _UNIFORMS) uniform numbers of positions block * _UNIFORMS onward."""
        g = self._gen
        g.manual_seed(_seed(self.seed, epoch, self.rank, 0, block))
        return torch.rand(2, _UNIFORMS, generator=g, dtype=torch.float64)

    def _perm(self, d: int, rnd: int, epoch: int) -> Tensor:
        """The permutation of domain d's local examples for pass ``rnd`` (cached: the latest)."""
        cached = self._perms.get(d)
        if cached is not None and cached[0] == rnd:
            return cached[1]
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, self.rank, 1, d, rnd))
        perm = torch.randperm(int(self._local[d]), generator=g)
        self._perms[d] = (rnd, perm)
        return perm

    def _map(self, u: Tensor, cdf: Tensor, cursors: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """(domains, global indices) of the draws whose uniform numbers are ``u`` (2, n).

        ``cdf`` is the weights' cumulative sum divided by the total, so its last positive
        entry is exactly 1 > u: a zero-weight domain is never picked.
        """
        dom = torch.searchsorted(cdf, u[0], right=True)
        if self.replacement:
            # u < 1 and n < 2**53 make u * n < n exactly, so the floor is a valid index
            local = (u[1] * self._local_f[dom]).long()
        else:
            local = torch.empty(dom.numel(), dtype=torch.int64)
            present = torch.bincount(dom, minlength=len(self.sizes)).nonzero().flatten()
            for d in present.tolist():
                where = (dom == d).nonzero().flatten()
                pos = cursors[d] + torch.arange(where.numel())
                n = int(self._local[d])
                rounds = pos // n
                for rnd in range(int(rounds[0]), int(rounds[-1]) + 1):  # nondecreasing
                    sel = rounds == rnd
                    local[where[sel]] = self._perm(d, rnd, epoch)[pos[sel] - rnd * n]
        if self.world_size > 1:
            local = local * self.world_size
        return dom, self._base[dom] + local

    def _cdf(self, probs: list[float]) -> Tensor:
        cdf = list(itertools.accumulate(probs))
        if not cdf[-1] > 0:
            raise ConvexMixError(f"the weights have no positive entry: {probs}.")
        return torch.tensor(cdf, dtype=torch.float64) / cdf[-1]

    def __iter__(self) -> Iterator[int]:
        if self._pending is not None:
            st, self._pending = self._pending, None
        else:
            st = self._fresh_state()
        self._state = st
        epoch, live, n_total = st["epoch"], self._live, self.num_samples
        pos, cursors = st["position"], st["cursors"]
        k = len(self.sizes)
        ublock, u = -1, torch.empty(0)
        probs: list[float] = []
        cdf = torch.empty(0)
        chunk, changed = 0, True
        while pos < n_total:
            b = pos // _UNIFORMS
            if b != ublock:
                u, ublock = self._uniforms(epoch, b), b
            # after a weight change a short chunk, then doubling ones
            chunk = _FIRST_CHUNK if changed else min(2 * chunk, _MAX_CHUNK)
            end = min(pos + chunk, (b + 1) * _UNIFORMS, n_total)
            current = self._current()
            if current is not probs:
                probs, cdf = current, self._cdf(current)
            version = live._version if live is not None else 0
            lo = b * _UNIFORMS
            dom, idx = self._map(u[:, pos - lo : end - lo], cdf, cursors, epoch)
            st.update(chunk_start=pos, cursors=cursors, dom=dom)
            start, changed = pos, False
            if live is None:
                for index in idx.tolist():
                    pos += 1
                    st["position"] = pos
                    yield index
            else:
                for index in idx.tolist():
                    if live._version != version:
                        changed = True  # map the rest with the new weights
                        break
                    pos += 1
                    st["position"] = pos
                    yield index
            if not self.replacement:
                cursors = cursors + torch.bincount(dom[: pos - start], minlength=k)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The epoch, the position in it and (``replacement=False``) how far each domain's
        passes have got: all :meth:`load_state_dict` needs."""
        st = self._state
        cursors = st["cursors"]
        used = st["position"] - st["chunk_start"]
        if not self.replacement and used > 0:
            cursors = cursors + torch.bincount(st["dom"][:used], minlength=len(self.sizes))
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "sizes": list(self.sizes),
            "replacement": self.replacement,
            "num_samples": self.num_samples,
            "epoch": st["epoch"],
            "position": st["position"],
            "cursors": cursors.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration continues where the saved one stopped, identically.

        The seed, rank, world size, domain sizes, ``replacement`` and ``num_samples`` must
        match this sampler. Restore the :class:`MixtureWeights` from its own state first.
        """
        for key in ("seed", "rank", "world_size", "sizes", "replacement", "num_samples"):
            mine = getattr(self, key)
            if key not in state or (list(state[key]) if key == "sizes" else state[key]) != mine:
                raise ConvexMixError(
                    f"the sampler state has {key}={state.get(key)!r}; this sampler has {mine!r}."
                )
        cursors = torch.as_tensor(state["cursors"], dtype=torch.int64).clone()
        if cursors.shape != (len(self.sizes),):
            raise ShapeError(
                f"state['cursors'] must have shape ({len(self.sizes)},); "
                f"got {tuple(cursors.shape)}."
            )
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        self._pending = {
            "epoch": self.epoch,
            "position": position,
            "chunk_start": position,
            "cursors": cursors,
            "dom": torch.empty(0, dtype=torch.int64),
        }
        self._state = dict(self._pending)


def _sizes(domains: Any, weights: Any) -> list[int]:
    if isinstance(domains, ConcatDataset):
        domains = list(domains.datasets)
    if isinstance(domains, Mapping):
        keys = list(domains)
        if isinstance(weights, MixtureWeights):
            if set(keys) != set(weights.domains) or len(keys) != len(weights.domains):
                raise ConvexMixError(
                    f"the domain mapping has keys {keys}; "
                    f"the weights' domains are {weights.domains}."
                )
            keys = list(weights.domains)
        domains = [domains[key] for key in keys]
    if isinstance(domains, str | bytes) or not isinstance(domains, Sequence):
        raise ConvexMixTypeError(
            "domains must be a sequence of sizes or datasets, a ConcatDataset or a mapping; "
            f"got {type(domains).__name__}."
        )
    sizes: list[int] = []
    for d in domains:
        if isinstance(d, bool):
            raise ConvexMixTypeError(f"a domain size must be an int; got {d!r}.")
        if isinstance(d, int):
            sizes.append(d)
        elif isinstance(d, Sized):
            sizes.append(len(d))
        else:
            raise ConvexMixTypeError(
                f"each domain must be an int size or a sized dataset; got {type(d).__name__}."
            )
    if not sizes:
        raise ConvexMixError("need at least one domain; got none.")
    return sizes


def _fixed_probs(weights: Any, k: int) -> Tensor:
    try:
        p = torch.as_tensor(weights, dtype=torch.float64).detach().to("cpu").clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConvexMixTypeError(
            f"weights must be a MixtureWeights or K probabilities; got {type(weights).__name__}."
        ) from err
    if p.shape != (k,):
        raise ShapeError(f"weights must have shape ({k},) (one per domain); got {tuple(p.shape)}.")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not bool((p > 0).any()):
        raise ConvexMixError(f"weights must be finite, >= 0 and not all 0; got {p.tolist()}.")
    return p / p.sum()
