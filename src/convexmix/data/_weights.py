"""Online domain weights on the simplex: DoReMi, exponentiated gradient and EXP3 (private;
the face is :mod:`convexmix.data`)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from convexmix.data._reduce import gather_sum, group_rank_world
from convexmix.errors import ConvexMixError, ConvexMixTypeError, ShapeError

__all__ = ["MixtureWeights"]

_UPDATES = ("doremi", "eg", "exp3")
_F64 = torch.float64

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
        self.domains: list[Hashable] = _domains(domains)
        k = len(self.domains)
        self._index = {d: i for i, d in enumerate(self.domains)}
        if update not in _UPDATES:
            raise ConvexMixError(f"update must be one of {_UPDATES}; got {update!r}.")
        self.update = update
        self.lr = _positive_float(lr, "lr")
        self.smoothing = _unit_float(smoothing, "smoothing")
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
        k = len(self.domains)
        loss, seen = self._vector(domain_losses, "domain_losses")
        if reference_losses is None:
            ref = [0.0] * k
        else:
            ref, ref_seen = self._vector(reference_losses, "reference_losses")
            if ref_seen != seen and any(s and not r for s, r in zip(seen, ref_seen, strict=True)):
                missing = [
                    d for d, s, r in zip(self.domains, seen, ref_seen, strict=True) if s and not r
                ]
                raise ConvexMixError(
                    f"reference_losses must cover every observed domain; missing {missing}."
                )
        if counts is None:
            n = [1.0 if s else 0.0 for s in seen]
        else:
            n, _ = self._vector(counts, "counts")
            if not all(0 <= v < math.inf for v in n):
                raise ConvexMixError(f"counts must be finite and >= 0; got {n}.")
        # What this rank contributes: loss * count, reference * count, count and a flag
        # for a non-finite value (reported, never summed); 0 where unobserved.
        lsum, rsum, cnt, flags = [0.0] * k, [0.0] * k, [0.0] * k, [0.0] * k
        excess, bad = [0.0] * k, False
        for i in range(k):
            c = n[i]
            if not seen[i] or not c:
                continue
            x, r = loss[i], ref[i]
            if x - x or r - r:  # NaN for a NaN or an infinity
                flags[i], bad = 1.0, True
                continue
            lsum[i], rsum[i], cnt[i], excess[i] = x * c, r * c, c, x - r
        if group_rank_world(self.process_group)[1] > 1:
            packed = torch.tensor([lsum, rsum, cnt, flags], dtype=_F64)
            lsum, rsum, cnt, flags = gather_sum(packed, self.process_group).tolist()
            # the count-weighted mean over the ranks
            excess = [
                ls / c - rs / c if c else 0.0 for ls, rs, c in zip(lsum, rsum, cnt, strict=True)
            ]
            bad = any(flags)
        if bad:
            names = [d for d, f in zip(self.domains, flags, strict=True) if f]
            here = {
                d: x if x - x else r
                for d, x, r, s in zip(self.domains, loss, ref, seen, strict=True)
                if s and (x - x or r - r)
            }
            raise ConvexMixError(
                f"MixtureWeights.step expects finite losses; domains {names} have a NaN "
                f"or infinite loss or reference loss (on this rank: {here or 'none'}). "
                "The weights are unchanged."
            )
        self._apply(excess, [c > 0 for c in cnt])

    def _apply(self, excess: list[float], observed: list[bool]) -> None:
        k, c, lr, w = len(self.domains), self.smoothing, self.lr, self._weights
        if self.update == "exp3":
            if any(o and p == 0 for o, p in zip(observed, w, strict=True)):
                raise ConvexMixError(
                    "exp3 got feedback for a domain whose weight is 0 (its importance "
                    "weight is infinite); use smoothing > 0 so every domain keeps a chance."
                )
            scores = [
                s + lr * (x / p) if o else s
                for s, x, p, o in zip(self._scores, excess, w, observed, strict=True)
            ]
            logits = scores
        else:
            clip = self.update == "doremi"
            scores = [
                (max(x, 0.0) if clip else x) if o else s
                for x, o, s in zip(excess, observed, self._scores, strict=True)
            ]
            log, inf = math.log, -math.inf
            logits = [(log(p) if p > 0 else inf) + lr * s for p, s in zip(w, scores, strict=True)]
        if any(math.isnan(v) or v == math.inf for v in logits):
            raise ConvexMixError(
                f"the update overflowed (log-weights {logits}) at lr={lr}; "
                "lower lr. The weights are unchanged."
            )
        new = _softmax(logits)
        if c > 0:
            new = [(1.0 - c) * p + c / k for p in new]
        self._scores = scores
        self._weights = new
        self._steps += 1
        t = self._steps
        if t == 1:
            self._average = list(new)
        else:
            self._average = [a + (p - a) / t for a, p in zip(self._average, new, strict=True)]
        self._version += 1

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
        self.lr = _positive_float(state["lr"], "lr")
        self.smoothing = _unit_float(state["smoothing"], "smoothing")
        self._weights = lists["weights"]
        self._average = lists["average"]
        self._scores = lists["scores"]
        self._steps = int(state["steps"])
        self._version += 1

    # ------------------------------------------------------------------ inputs
    def _vector(self, values: object, what: str) -> tuple[list[float], list[bool]]:
        """K float values and the observed flags from a mapping or a (K,) vector."""
        k = len(self.domains)
        if isinstance(values, Mapping):
            out = [0.0] * k
            seen = [False] * k
            index = self._index
            for name, v in values.items():
                i = index.get(name)
                if i is None:
                    raise ConvexMixError(
                        f"{what} names an unknown domain {name!r}; the domains are {self.domains}."
                    )
                t = type(v)
                out[i] = v if t is float else float(v) if t is int else _scalar(v, what, name)
                seen[i] = True
            return out, seen
        if isinstance(values, Tensor):
            if values.shape != (k,):
                raise ShapeError(
                    f"{what} must have shape ({k},) (one per domain); got {tuple(values.shape)}."
                )
            vals = [float(v) for v in values.detach().to("cpu", _F64).tolist()]
        elif isinstance(values, Sequence) and not isinstance(values, str):
            vals = [_scalar(v, what, i) for i, v in enumerate(values)]
            if len(vals) != k:
                raise ShapeError(f"{what} must have {k} values (one per domain); got {len(vals)}.")
        else:
            raise ConvexMixTypeError(
                f"{what} must be a mapping {{domain: value}} or a ({k},) tensor; "
                f"got {type(values).__name__}."
            )
        return vals, [True] * k

    def _probs(self, init: Losses) -> list[float]:
        p, seen = self._vector(init, "init")
        if not all(seen):
            missing = [d for d, s in zip(self.domains, seen, strict=True) if not s]
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


def _domains(domains: Sequence[Hashable] | int) -> list[Hashable]:
    if isinstance(domains, bool):
        raise ConvexMixTypeError(f"domains must be names or a count; got {domains!r}.")
    if isinstance(domains, int):
        if domains < 1:
            raise ConvexMixError(f"the number of domains must be >= 1; got {domains}.")
        return list(range(domains))
    if isinstance(domains, str) or not isinstance(domains, Sequence | Mapping):
        raise ConvexMixTypeError(
            f"domains must be a sequence of names or a count; got {type(domains).__name__}."
        )
    names = list(domains)
    if not names:
        raise ConvexMixError("domains must name at least one domain; got none.")
    try:
        unique = len(set(names)) == len(names)
    except TypeError as err:
        raise ConvexMixTypeError(f"domain names must be hashable; got {names!r}.") from err
    if not unique:
        raise ConvexMixError(f"domain names must be unique; got {names}.")
    return names


def _scalar(v: object, what: str, name: object) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ShapeError(f"{what}[{name!r}] must be a scalar; got shape {tuple(v.shape)}.")
        return float(v.detach().reshape(()).item())
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConvexMixTypeError(f"{what}[{name!r}] must be a number; got {v!r}.") from err


def _positive_float(x: object, name: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConvexMixTypeError(f"{name} must be a number; got {x!r}.") from err
    if not (math.isfinite(v) and v > 0):
        raise ConvexMixError(f"{name} must be finite and > 0; got {x!r}.")
    return v


def _unit_float(x: object, name: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConvexMixTypeError(f"{name} must be a number; got {x!r}.") from err
    if not 0.0 <= v <= 1.0:
        raise ConvexMixError(f"{name} must be in [0, 1]; got {x!r}.")
    return v
