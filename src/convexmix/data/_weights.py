"""Online domain weights on the simplex: DoReMi, exponentiated gradient and EXP3 (private;
the face is :mod:`convexmix.data`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Mapping, Sequence
from itertools import repeat
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from convexmix.data._reduce import gather_sum, group_rank_world, is_distributed
from convexmix.data._values import (
    domain_names,
    positive_float,
    read_values,
    unit_float,
    valid_counts,
)
from convexmix.errors import ConvexMixError, ShapeError

__all__ = ["MixtureWeights"]

_UPDATES = ("doremi", "eg", "exp3")
_F64 = torch.float64
_DIST = dist.is_available()
# the float functions of the update, as module globals (a cached lookup in a comprehension)
_ln, _exp, _fsum, _NEG_INF = math.log, math.exp, math.fsum, -math.inf
_FMAX = sys.float_info.max  # a count above it is not finite as a float
_IMAX = int(_FMAX)  # the largest int count that converts to a finite float

Losses = Mapping[Any, float | Tensor] | Tensor | Sequence[float]


class MixtureWeights:
    r"""Mixture weights over named data domains, updated online from per-domain losses.

    Every update moves weight toward the domains with the higher (excess) loss, in log
    space: the new weights are a max-shifted softmax of the log-weights, stable for any
    loss size (a huge loss gives a one-hot, never NaN). With :math:`w_{t-1}` the weights
    before step :math:`t`,
    :math:`\eta` = ``lr``, :math:`c` = ``smoothing``, :math:`u = 1/K`:

    - ``"doremi"`` (Xie et al., 2023, Algorithm 1): the clipped excess loss
      :math:`\lambda_{t,i} = \max(\ell_{t,i} - \ell^{ref}_{t,i}, 0)`,
      :math:`w'_t = \mathrm{softmax}(\log w_{t-1} + \eta \lambda_t)`,
      :math:`w_t = (1 - c)\, w'_t + c\, u`. The paper uses :math:`\eta = 1`, :math:`c = 10^{-3}`.
    - ``"eg"``: exponentiated gradient ascent on the (unclipped) losses, the group-DRO
      update: :math:`g_{t,i} = \ell_{t,i} - \ell^{ref}_{t,i}` (the reference is 0 when not
      given), :math:`w_t = (1 - c)\,\mathrm{softmax}(\log w_{t-1} + \eta g_t) + c\, u`.
    - ``"exp3"``: the EXP3 bandit (Auer et al., 2002; online data mixing, Albalak et al.,
      2023) with importance-weighted feedback :math:`\hat g_{t,i} = (\ell_{t,i} -
      \ell^{ref}_{t,i}) / w_{t-1,i}` for the observed domains and 0 for the others;
      the scores accumulate, :math:`S_t = S_{t-1} + \eta \hat g_t` with
      :math:`S_0 = \log w_0`, and the exploration mix is applied to the output only,
      :math:`w_t = (1 - c)\,\mathrm{softmax}(S_t) + c\, u` (``smoothing`` is EXP3's
      :math:`\gamma`; give it ``> 0`` so every domain keeps being sampled).

    :attr:`average` is DoReMi's result, the mean of the weights after each step,
    :math:`\bar w_T = \frac1T \sum_{t=1}^{T} w_t` (the paper's formula; DoReMi's code also
    counts :math:`w_0`). Before the first step it is :math:`w_0`.

    A domain missing from a step (absent from the mapping, or with count 0) is
    unobserved. For ``"doremi"`` and ``"eg"`` its last observed score is reused, as
    DoReMi's reference code does (0 before its first observation); for ``"exp3"`` its
    feedback is 0, the bandit rule.

    DoReMi clips the excess loss per token before averaging over a domain; to reproduce
    that exactly, pass ``domain_losses = mean(clamp(token_loss - ref_token_loss, min=0))``
    per domain and no reference. With per-domain means and a reference, the clip is taken
    after the mean.

    Under ``torch.distributed`` (initialised, more than one process), :meth:`step`
    gathers every rank's per-domain ``loss * count``, ``reference * count`` and
    ``count`` and sums them in rank order, so each domain's loss is the count-weighted
    mean over ranks and every rank computes bit-identical weights. Every rank must call
    :meth:`step` together (it is a collective). A NaN or infinite loss on any rank is a
    :class:`~convexmix.ConvexMixError` on every rank, raised before anything changes.

    Args:
        domains: the domain names (unique, hashable), or ``K`` for the names ``0..K-1``.
        update: ``"doremi"``, ``"eg"`` or ``"exp3"``.
        lr: the step size :math:`\eta > 0`.
        smoothing: :math:`c \in [0, 1]`, the mix toward uniform after each step.
        init: the starting weights :math:`w_0` (probabilities; a mapping by domain name,
            or a sequence/tensor in ``domains`` order); uniform by default. A zero
            weight stays zero unless ``smoothing > 0``.
        process_group: the group to reduce over; ``None`` is the default group when
            torch.distributed is initialised, else no reduction.

    Example:
        >>> import torch
        >>> from convexmix.data import MixtureWeights
        >>> mw = MixtureWeights(["web", "code", "books"], lr=1.0, smoothing=1e-3)
        >>> losses = {"web": 2.0, "code": 3.5, "books": 2.4}
        >>> mw.step(losses, {"web": 2.0, "code": 2.5, "books": 2.2})
        >>> mw.weights
        tensor([0.2026, 0.5501, 0.2473], dtype=torch.float64)
        >>> mw.step({"code": 3.0})  # web and books unobserved: their last scores are reused
        >>> mw.average.sum().item()
        1.0
    """

    def __init__(
        self,
        domains: Sequence[Hashable] | int,
        *,
        update: str = "doremi",
        lr: float,
        smoothing: float = 0.0,
        init: Losses | None = None,
        process_group: Any = None,
    ) -> None:
        self.domains: list[Hashable] = domain_names(domains)
        k = len(self.domains)
        self._index = {d: i for i, d in enumerate(self.domains)}
        if update not in _UPDATES:
            raise ConvexMixError(f"update must be one of {_UPDATES}; got {update!r}.")
        self.update = update
        self.lr = positive_float(lr, "lr")
        self.smoothing = unit_float(smoothing, "smoothing")
        self.process_group = process_group
        # The state is K Python floats (float64): for the K of a data mixture, a step in
        # plain float arithmetic costs microseconds where a dozen small tensor ops cost
        # tens of them, and it is the same IEEE arithmetic on every rank.
        w0 = [1.0 / k] * k if init is None else self._probs(init)
        self._weights: list[float] = w0
        self._average: list[float] = list(w0)
        # doremi/eg: the last score of each domain; exp3: the cumulative scores S_t
        self._scores: list[float] = [_log(p) for p in w0] if update == "exp3" else [0.0] * k
        self._steps = 0
        self._version = 0

    # ------------------------------------------------------------------ reading
    @property
    def weights(self) -> Tensor:
        """The current weights :math:`w_t`, (K,) float64 (a new tensor)."""
        return torch.tensor(self._weights, dtype=_F64)

    @property
    def average(self) -> Tensor:
        """The mean of :math:`w_1..w_T` (DoReMi's output), (K,) float64; :math:`w_0` at T = 0."""
        return torch.tensor(self._average, dtype=_F64)

    @property
    def steps(self) -> int:
        """How many updates have been applied."""
        return self._steps

    @property
    def version(self) -> int:
        """A counter that changes whenever the weights change (a step or a load)."""
        return self._version

    def as_dict(self, average: bool = False) -> dict[Hashable, float]:
        """The weights (or the average) by domain name, as floats."""
        return dict(zip(self.domains, self._average if average else self._weights, strict=True))

    def __repr__(self) -> str:
        ws = ", ".join(f"{d!r}: {v:.4g}" for d, v in self.as_dict().items())
        return (
            f"MixtureWeights({{{ws}}}, update={self.update!r}, lr={self.lr}, "
            f"smoothing={self.smoothing}, steps={self._steps})"
        )

    # ------------------------------------------------------------------ update
    def step(
        self,
        domain_losses: Losses,
        reference_losses: Losses | None = None,
        *,
        counts: Losses | None = None,
    ) -> None:
        """One update from this step's per-domain losses (see the class for the formulas).

        Args:
            domain_losses: ``{domain: loss}`` for the domains observed in this step, or a
                (K,) tensor/sequence in ``domains`` order (every domain observed).
            reference_losses: the reference model's losses, same forms; required for the
                observed domains when given (a mapping), 0 when ``None``.
            counts: how many examples (or tokens) each domain's loss averages, same forms;
                they weight the mean across ranks under torch.distributed. A count of 0
                marks a domain unobserved (its loss is ignored, so the NaN mean of an
                empty group is fine). Default: 1 per observed domain.

        Raises:
            ConvexMixError: a NaN or infinite loss (on any rank), an unknown domain, a
                negative count; the weights are left unchanged.
        """
        if not self._step_mappings(domain_losses, reference_losses, counts):
            self._step_any(domain_losses, reference_losses, counts)

    def _step_mappings(self, losses: object, refs: object, counts: object) -> bool:
        """The step for the common form, dicts of floats (counts: ints or floats), on one
        process: it reads the dicts in the same pass that updates the scores. Anything
        else (another form, an unknown domain, another type, a NaN, a missing reference,
        an invalid count, torch.distributed) returns False with nothing changed, and
        :meth:`_step_any` takes the step (or raises its error)."""
        if (
            type(losses) is not dict
            or (refs is not None and type(refs) is not dict)
            or (counts is not None and type(counts) is not dict)
        ):
            return False
        if _DIST and dist.is_initialized():
            if is_distributed(self.process_group):
                return False
        elif self.process_group is not None:
            return False  # a group without torch.distributed: the general path reports it
        # The three mappings looked up in C, a domain at a time (no references: 0 for
        # each, no counts: 1). A None is an absent key: the misses are counted, and a
        # mapping whose length is not K minus its misses has a key that is not a domain.
        domains = self.domains
        it_ref = repeat(0.0) if refs is None else map(refs.get, domains)
        it_count = repeat(1) if counts is None else map(counts.get, domains)
        lr, w, rule = self.lr, self._weights, self.update
        doremi, eg = rule == "doremi", rule == "eg"
        scores = list(self._scores)
        no_loss = no_ref = no_count = 0
        for i, (x, r, c) in enumerate(
            zip(map(losses.get, domains), it_ref, it_count)  # noqa: B905
        ):
            if type(r) is not float:
                if r is not None:
                    return False
                no_ref += 1
            if type(c) is int:
                if c < 0 or c > _IMAX:
                    return False
            elif c is None:
                no_count += 1
            elif type(c) is not float or not 0.0 <= c <= _FMAX:
                return False
            if type(x) is not float:
                if x is not None:
                    return False
                no_loss += 1
                continue
            if r is None:
                return False  # no reference for an observed domain
            if not c:
                continue
            g = x - r
            if g - g:  # NaN: x or r is not finite (or x - r overflowed)
                return False
            if doremi:  # the clipped excess, max(x - r, 0)
                scores[i] = 0.0 if g < 0.0 else g
            elif eg:
                scores[i] = g
            elif w[i] == 0.0:
                return False
            else:  # exp3: importance-weighted feedback, accumulated
                scores[i] += lr * (g / w[i])
        k = len(domains)
        if (
            len(losses) + no_loss != k
            or (refs is not None and len(refs) + no_ref != k)
            or (counts is not None and len(counts) + no_count != k)
        ):
            return False  # a key that is not a domain, or a None value
        self._commit(scores)
        return True

    def _step_any(self, domain_losses: object, reference_losses: object, counts: object) -> None:
        """The step for every form, under torch.distributed too, with its errors."""
        # Each input as K floats in ``domains`` order, None where a mapping omits a domain;
        # read in this order so that the first bad input is the one reported.
        loss = self._read(domain_losses, "domain_losses")
        ref = None
        if reference_losses is not None:
            ref = self._read(reference_losses, "reference_losses")
            if None in ref:
                missing = [
                    d
                    for d, x, r in zip(self.domains, loss, ref, strict=True)
                    if x is not None and r is None
                ]
                if missing:
                    raise ConvexMixError(
                        f"reference_losses must cover every observed domain; missing {missing}."
                    )
        cnt = None
        if counts is not None:
            cnt = self._read(counts, "counts")
            if not valid_counts(cnt):
                got = [0.0 if c is None else c for c in cnt]
                raise ConvexMixError(f"counts must be finite and >= 0; got {got}.")
        if group_rank_world(self.process_group)[1] > 1:
            loss, ref = self._pool(loss, ref, cnt)
            cnt, check = None, False  # pooled: finite, and None where no rank observed
        else:
            check = True
        # One pass over the domains: the observed ones (a loss, and a count that is not 0)
        # update their scores; the others keep theirs (doremi, eg) or get no feedback (exp3).
        lr, w, rule = self.lr, self._weights, self.update
        scores = list(self._scores)
        bad = zero = False
        for i, x in enumerate(loss):
            if x is None or (cnt is not None and not cnt[i]):
                continue
            r = 0.0 if ref is None else ref[i]
            assert r is not None  # the reference covers every observed domain
            if check and (x - x or r - r):  # NaN for a NaN or an infinity
                bad = True
            elif rule == "doremi":  # the clipped excess, max(x - r, 0)
                g = x - r
                scores[i] = 0.0 if g < 0.0 else g
            elif rule == "eg":
                scores[i] = x - r
            elif w[i] == 0:
                zero = True
            else:  # exp3: importance-weighted feedback, accumulated
                scores[i] += lr * ((x - r) / w[i])
        if bad:
            self._raise_non_finite(loss, ref, cnt)
        if zero:
            raise ConvexMixError(
                "exp3 got feedback for a domain whose weight is 0 (its importance "
                "weight is infinite); use smoothing > 0 so every domain keeps a chance."
            )
        self._commit(scores)

    def _commit(self, scores: list[float]) -> None:
        """The new weights from the new scores, and the average; nothing changes on error.

        Every list here has K entries by construction, so the zips take no ``strict``: a
        keyword argument to ``zip`` costs a quarter of a microsecond on CPython 3.11.
        """
        lr, w = self.lr, self._weights
        if self.update == "exp3":
            logits = scores
        else:
            logits = [(_ln(p) if p > 0.0 else _NEG_INF) + lr * s for p, s in zip(w, scores)]  # noqa: B905
        # softmax(logits) = exp(v - max) / sum. The sum is NaN exactly when a logit is NaN
        # or the largest is infinite: the update overflowed.
        m = max(logits)
        e = [_exp(v - m) for v in logits]
        total = _fsum(e)
        if total != total:
            raise ConvexMixError(
                f"the update overflowed (log-weights {logits}) at lr={lr}; "
                "lower lr. The weights are unchanged."
            )
        c = self.smoothing
        if c > 0.0:
            keep, spread = 1.0 - c, c / len(w)
            new = [keep * (v / total) + spread for v in e]
        else:
            new = [v / total for v in e]
        self._scores = scores
        self._weights = new
        self._steps = t = self._steps + 1
        if t > 1:
            tf = float(t)  # the same quotient as by the int, without converting it K times
            avg = self._average
            self._average = [a + (p - a) / tf for a, p in zip(avg, new)]  # noqa: B905
        else:
            self._average = list(new)
        self._version += 1

    def _pool(
        self,
        loss: list[float | None],
        ref: list[float | None] | None,
        cnt: list[float | None] | None,
    ) -> tuple[list[float | None], list[float | None]]:
        """The losses and reference losses pooled over the ranks: count-weighted means,
        bit-identical on every rank, None for a domain that no rank observed."""
        k = len(self.domains)
        # What this rank contributes: loss * count, reference * count, count and a flag
        # for a non-finite value (reported, never summed); 0 where unobserved.
        lsum, rsum, num, flags = [0.0] * k, [0.0] * k, [0.0] * k, [0.0] * k
        for i in range(k):
            x = loss[i]
            c = 1.0 if cnt is None else cnt[i]
            if x is None or not c:
                continue
            r = 0.0 if ref is None else ref[i]
            assert c is not None
            assert r is not None
            if x - x or r - r:  # NaN for a NaN or an infinity
                flags[i] = 1.0
                continue
            lsum[i], rsum[i], num[i] = x * c, r * c, c
        packed = torch.tensor([lsum, rsum, num, flags], dtype=_F64)
        lsum, rsum, num, flags = gather_sum(packed, self.process_group).tolist()
        if any(flags):
            self._raise_non_finite(loss, ref, cnt, flags)
        return (
            [ls / c if c else None for ls, c in zip(lsum, num, strict=True)],
            [rs / c if c else None for rs, c in zip(rsum, num, strict=True)],
        )

    def _raise_non_finite(
        self,
        loss: list[float | None],
        ref: list[float | None] | None,
        cnt: list[float | None] | None,
        flags: list[float] | None = None,
    ) -> None:
        """The error for a NaN or infinite loss; ``flags`` marks the domains of every rank
        (None: this rank's observed domains alone)."""
        names, here = [], {}
        for i, d in enumerate(self.domains):
            x = loss[i]
            if x is None:
                continue
            r = 0.0 if ref is None else ref[i]
            assert r is not None
            if x - x or r - r:
                here[d] = x if x - x else r
                if flags is None and (cnt is None or cnt[i]):
                    names.append(d)
        if flags is not None:
            names = [d for d, f in zip(self.domains, flags, strict=True) if f]
        raise ConvexMixError(
            f"MixtureWeights.step expects finite losses; domains {names} have a NaN "
            f"or infinite loss or reference loss (on this rank: {here or 'none'}). "
            "The weights are unchanged."
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs (float64 tensors)."""
        return {
            "domains": list(self.domains),
            "update": self.update,
            "lr": self.lr,
            "smoothing": self.smoothing,
            "weights": torch.tensor(self._weights, dtype=_F64),
            "average": torch.tensor(self._average, dtype=_F64),
            "scores": torch.tensor(self._scores, dtype=_F64),
            "steps": self._steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a ``MixtureWeights`` over the same domains.

        ``lr`` and ``smoothing`` are restored as well (they may follow a schedule).
        """
        keys = {"domains", "update", "weights", "average", "scores", "steps", "lr", "smoothing"}
        if not isinstance(state, Mapping) or not keys <= set(state):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ConvexMixError(f"a MixtureWeights state_dict has keys {sorted(keys)}; got {got}.")
        if list(state["domains"]) != self.domains or state["update"] != self.update:
            raise ConvexMixError(
                f"the state is for domains {list(state['domains'])} with update "
                f"{state['update']!r}; this MixtureWeights has {self.domains}, {self.update!r}."
            )
        k = len(self.domains)
        lists = {}
        for key in ("weights", "average", "scores"):
            t = torch.as_tensor(state[key]).detach().to("cpu", _F64)
            if t.shape != (k,):
                raise ShapeError(f"state[{key!r}] must have shape ({k},); got {tuple(t.shape)}.")
            lists[key] = [float(v) for v in t.tolist()]
        self.lr = positive_float(state["lr"], "lr")
        self.smoothing = unit_float(state["smoothing"], "smoothing")
        self._weights = lists["weights"]
        self._average = lists["average"]
        self._scores = lists["scores"]
        self._steps = int(state["steps"])
        self._version += 1

    # ------------------------------------------------------------------ inputs
    def _read(self, values: object, what: str) -> list[float | None]:
        """K floats in ``domains`` order (None for a domain a mapping omits)."""
        return read_values(values, what, self.domains, self._index)

    def _probs(self, init: Losses) -> list[float]:
        given = self._read(init, "init")
        p = [v for v in given if v is not None]
        if len(p) != len(given):
            missing = [d for d, v in zip(self.domains, given, strict=True) if v is None]
            raise ConvexMixError(f"init must give every domain a weight; missing {missing}.")
        total = math.fsum(p)
        if not all(math.isfinite(v) and v >= 0 for v in p) or abs(total - 1) > 1e-6:
            raise ConvexMixError(
                f"init must be probabilities (>= 0, summing to 1); got {p} (sum {total:.6g})."
            )
        return [v / total for v in p]


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def _softmax(x: list[float]) -> list[float]:
    """``exp(x - max) / sum``: the softmax in float64, ``-inf`` entries exactly 0."""
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = math.fsum(e)
    return [v / s for v in e]
