r"""Sampling maps: Gumbel-softmax and Gumbel top-k, hard or relaxed (private module).

A sample perturbs the logits with Gumbel noise, :math:`z = x + g`,
:math:`g = -\log(-\log U)`, and keeps the largest entry (or the k largest): an exact draw
from :math:`\mathrm{softmax}(x)` (Gumbel-max), or without replacement from the
Plackett-Luce model (Gumbel top-k). The relaxed forms replace the argmax by
:math:`\mathrm{softmax}(z/\tau)` (Jang et al. 2017; Maddison et al. 2017) and the top-k by
k successive softmaxes, each over what the previous ones left (Xie & Ermon 2019).

Noise: U is drawn in float32 (float64 for float64 logits) and clamped to the open
interval between the dtype's smallest normal and its largest value below 1, so g is
finite (between about -4.5 and 16.6 in float32). Logits are computed in float32 at least,
and the relaxation runs on :math:`(z - \max z)/\tau`, which cannot overflow for any
``tau > 0``: a ``tau`` below the dtype's range gives the hard sample, and ``tau = 0``
is the hard sample by definition.

Special values follow the maps' contract: masked and ``-inf`` entries are never chosen;
``+inf`` entries are chosen first (in a random order among themselves); a slice with
nothing present gives zeros; a NaN logit fills its slice with NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from convexmix._validation import any_true, is_number, prepare, traced
from convexmix.errors import ConvexMixError, ConvexMixTypeError
from convexmix.functional._softmax import _any_nan, safe_softmax

__all__ = ["gumbel_softmax", "sample_topk"]

#: Scaled key of a ``+inf`` logit above the largest finite one (0 after the shift):
#: exp(-1000) is 0 in every dtype, so the finite entries get no mass while a +inf entry
#: is left to take.
_INF_KEY = 1000.0


def _check_tau(tau: object) -> float:
    if not is_number(tau):
        raise ConvexMixTypeError(f"tau must be a number >= 0; got {type(tau).__name__}.")
    value = float(tau)
    if not value >= 0.0:  # NaN too
        raise ConvexMixError(f"tau must be >= 0 (0 = hard samples); got {tau}.")
    return value


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConvexMixTypeError(
            f"generator must be None or a torch.Generator; got {type(generator).__name__} "
            "(for a seed, pass torch.Generator().manual_seed(seed))."
        )


def _effective_tau(tau: float, dtype: torch.dtype) -> float:
    """``tau``, or 0 where it rounds to 0 in the compute ``dtype`` (a Python float such
    as 1e-300 is 0 in float32, and ``0 / 0`` would be NaN): the hard sample, the limit."""
    info = torch.finfo(dtype)
    return 0.0 if tau <= info.tiny * info.eps / 2 else tau


def _gumbel(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gumbel(0, 1) noise, finite: U from the open interval (tiny, 1 - eps/2)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if generator is not None and generator.device.type != like.device.type:
        raise ConvexMixError(
            f"generator is on {generator.device.type}, the logits on {like.device.type}: "
            "pass a torch.Generator of the logits' device."
        )
    u = torch.rand(shape, dtype=dtype, device=like.device, generator=generator)
    # rand gives [0, 1 - eps/2]: 0 would give g = -inf, so raise it to the smallest normal.
    u = u.clamp_min(torch.finfo(dtype).tiny)
    return u.log_().neg_().log_().neg_()


class _StraightThrough(torch.autograd.Function):
    """The hard sample forward, the relaxed sample's gradient backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hard: Tensor, soft: Tensor) -> Tensor:
        return hard.clone()

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def _keys(z: Tensor, g: Tensor, d: int, tau: float) -> Tensor:
    """The relaxation's scaled keys: ``(z - max z) / tau`` on the present finite entries
    (<= 0: no overflow for any tau > 0), ``_INF_KEY`` and below on the ``+inf`` ones (in
    their noise's order), -inf on the absent ones, NaN where ``z`` is NaN."""
    finite = torch.isfinite(z)
    m = torch.where(finite, z, -math.inf).amax(d, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    # only finite entries are divided: -inf / inf would be NaN at tau = inf
    s = torch.where(finite, (z - m) / tau, z)
    posinf = z == math.inf
    g_inf = torch.where(posinf, g, -math.inf)
    g_max = g_inf.amax(d, keepdim=True)
    inf_key = _INF_KEY + (g_inf - torch.where(torch.isfinite(g_max), g_max, 0.0)) / tau
    return torch.where(posinf, inf_key, s)


def _log1m_softmax(s: Tensor, a: Tensor, d: int) -> Tensor:
    """``log(1 - a)`` for ``a = softmax(s)``, accurate where ``a`` rounds to 1.

    Off the largest entry ``a <= 1/2`` and ``log1p(-a)`` is exact. On it, ``1 - a`` is the
    other entries' share, ``exp(logsumexp(others) - logsumexp(s))``, which keeps its
    exponent where ``1 - a`` would round to 0 (a penalty too small to take the entry out
    would let the next steps pick it again); with no other entry left it is ``-inf``.
    Stand-ins keep every gradient finite."""
    is_top = torch.zeros_like(s, dtype=torch.bool).scatter(d, s.argmax(d, keepdim=True), True)
    others = torch.where(is_top, -math.inf, s)
    none_left = (others == -math.inf).all(d, keepdim=True)
    log_rest = torch.logsumexp(torch.where(none_left, 0.0, others), d, keepdim=True)
    log_rest = log_rest - torch.logsumexp(torch.where(none_left, 0.0, s), d, keepdim=True)
    log_rest = torch.where(none_left, -math.inf, log_rest)
    return torch.where(is_top, log_rest, torch.log1p(-a.clamp(max=0.5)))


def _hard_topk(z: Tensor, g: Tensor, d: int, k: int) -> Tensor:
    """k-hot of the k largest present entries of ``z`` (+inf first, in the noise's order);
    a slice with fewer than k present entries keeps all of them; NaN slices are NaN."""
    posinf = z == math.inf
    present = ~torch.isnan(z) & (z != -math.inf)
    # +inf entries rank by their noise above every finite key.
    key = torch.where(posinf, 0.0, torch.where(present, z, -math.inf))
    n_inf = posinf.sum(d, keepdim=True)
    by_noise = torch.where(posinf, g, -math.inf)
    idx = torch.where(n_inf >= k, by_noise, torch.where(posinf, math.inf, key)).topk(k, d).indices
    out = torch.zeros_like(z).scatter(d, idx, 1.0)
    out = out * present  # fewer than k present: the picks beyond them are dropped
    has_nan = torch.isnan(z).any(d, keepdim=True)
    return torch.where(has_nan, math.nan, out)


def _finish(
    hard: Tensor | None, soft: Tensor | None, want_hard: bool, dtype: torch.dtype
) -> Tensor:
    if soft is None:  # tau = 0: the hard sample, with zero gradients
        assert hard is not None
        return hard.to(dtype)
    if not want_hard:
        return soft.to(dtype)
    assert hard is not None
    return _StraightThrough.apply(hard, soft).to(dtype)  # type: ignore[no-untyped-call,no-any-return]


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    *,
    hard: bool = False,
    dim: int = -1,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A Gumbel-softmax (Concrete) sample: :math:`\mathrm{softmax}((x + g) / \tau)`.

    ``hard=True`` gives the straight-through estimator: the one-hot of
    :math:`\arg\max (x + g)`, an exact draw from ``softmax(x)``, forward, and the relaxed
    sample's gradient backward. ``tau = 0`` gives the one-hot sample (zero gradients).

    Unlike ``torch.nn.functional.gumbel_softmax``, it never returns NaN or inf for finite
    or infinite logits, in any dtype or ``tau``; it takes a ``mask`` and a ``generator``.
    Masked and ``-inf`` entries are never chosen; ``+inf`` entries are chosen first; a
    slice with nothing present is zeros; a NaN logit fills its slice with NaN.

    Args:
        logits: unnormalised log-probabilities, any shape ``(..., K, ...)``, any floating
            dtype (float16/bfloat16 computed in float32).
        tau: the temperature, ``>= 0``; smaller is closer to one-hot.
        hard: the one-hot sample forward, the relaxed gradient backward.
        dim: the dimension of the K categories.
        mask: bool, True = present, broadcastable to ``logits``.
        generator: the ``torch.Generator`` to draw the noise from (reproducible samples).

    Returns:
        Tensor of the shape and dtype of ``logits``, each slice on the simplex (one-hot
        with ``hard`` or ``tau = 0``).

    Example:
        >>> import torch, convexmix as cx
        >>> g = torch.Generator().manual_seed(0)
        >>> y = cx.functional.gumbel_softmax(torch.tensor([1.0, 2.0, float("-inf")]), generator=g)
        >>> bool(abs(y.sum() - 1) < 1e-6), y[2].item()
        (True, 0.0)
        >>> cx.functional.gumbel_softmax(torch.tensor([0.0, 50.0]), tau=0)
        tensor([0., 1.])
    """
    tau = _check_tau(tau)
    if not isinstance(hard, bool):
        raise ConvexMixTypeError(f"hard must be a bool; got {type(hard).__name__}.")
    _check_generator(generator)
    z, d, _ = prepare(logits, dim, mask, 1.0)
    tau = _effective_tau(tau, z.dtype)
    if z.shape[d] == 0 or z.numel() == 0:
        return torch.zeros_like(logits)
    g = _gumbel(z.shape, z, generator)
    z = z + g.to(z.dtype)  # -inf (absent) stays -inf, NaN stays NaN
    if tau == 0.0:
        return _finish(_hard_topk(z.detach(), g, d, 1), None, True, logits.dtype)
    if not traced() and z.is_cpu:
        # The everyday call: finite logits and tau in range are torch.softmax(z / tau),
        # and the hard sample its argmax; a NaN anywhere in its output (a NaN, an
        # infinity, an all-absent slice, an overflow of z / tau) sends the call to the
        # careful form below.
        y = torch.softmax(z if tau == 1.0 else z / tau, d)
        if not _any_nan(y, d):
            if not hard:
                return y.to(logits.dtype)
            pick = torch.zeros_like(y).scatter_(d, z.detach().argmax(d, keepdim=True), 1.0)
            return _finish(pick, y, True, logits.dtype)
    soft = safe_softmax(_keys(z, g, d, tau), d)
    out_hard = _hard_topk(z.detach(), g, d, 1) if hard else None
    return _finish(out_hard, soft, hard, logits.dtype)


def sample_topk(
    logits: Tensor,
    k: int,
    tau: float = 1.0,
    *,
    hard: bool = False,
    dim: int = -1,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A Gumbel top-k subset sample: k of the K entries, without replacement.

    The hard sample (``hard=True`` forward, or ``tau = 0``) is the k-hot of the k largest
    :math:`x + g`: an exact draw of a k-subset from the Plackett-Luce model of
    ``softmax(x)``. The relaxed sample (Xie & Ermon 2019) sums k successive softmaxes,
    :math:`a_j = \mathrm{softmax}(\alpha_j / \tau)`,
    :math:`\alpha_{j+1} = \alpha_j + \log(1 - a_j)`, from :math:`\alpha_1 = x + g`:
    entries ``>= 0`` summing to ``k`` (as in the paper, an entry can exceed 1 at a high
    ``tau``), which tend to the k-hot sample as ``tau -> 0``. ``hard=True`` is the
    straight-through estimator (k-hot forward, the relaxed gradient backward).

    Special values as in :func:`gumbel_softmax`; a slice with fewer than ``k`` present
    entries selects all of them (its sum is their count). A slice whose keys
    :math:`(x + g - \max)/\tau` overflow the dtype's range (``tau`` below the range of
    its logits) gets the hard sample, the relaxation's limit.

    Args:
        logits: unnormalised log-probabilities ``(..., K, ...)``.
        k: the subset size, ``0 <= k <= K``.
        tau: the temperature, ``>= 0``.
        hard: the k-hot sample forward, the relaxed gradient backward.
        dim: the dimension of the K entries.
        mask: bool, True = present, broadcastable to ``logits``.
        generator: the ``torch.Generator`` to draw the noise from.

    Returns:
        Tensor of the shape and dtype of ``logits``.

    Example:
        >>> import torch, convexmix as cx
        >>> g = torch.Generator().manual_seed(0)
        >>> y = cx.functional.sample_topk(torch.zeros(5), 2, hard=True, generator=g)
        >>> y.sum().item(), sorted(set(y.tolist()))
        (2.0, [0.0, 1.0])
    """
    tau = _check_tau(tau)
    if not isinstance(hard, bool):
        raise ConvexMixTypeError(f"hard must be a bool; got {type(hard).__name__}.")
    _check_generator(generator)
    z, d, _ = prepare(logits, dim, mask, 1.0)
    tau = _effective_tau(tau, z.dtype)
    size = z.shape[d]
    if k.__class__ is not int or isinstance(k, bool):
        raise ConvexMixTypeError(f"k must be an int; got {type(k).__name__}.")
    if not 0 <= k <= size:
        raise ConvexMixError(f"k must be between 0 and K = {size} (the size of dim {d}); got {k}.")
    if k == 0 or z.numel() == 0:
        return torch.zeros_like(logits)
    g = _gumbel(z.shape, z, generator)
    z = z + g.to(z.dtype)
    if tau == 0.0:
        return _finish(_hard_topk(z.detach(), g, d, k), None, True, logits.dtype)
    s = _keys(z, g, d, tau)
    # A slice whose scaled keys overflow (a present finite entry at -inf: tau below the
    # range of its logits' spread) loses the order of the entries after the first pick:
    # it takes its limit, the hard sample. (Eager calls skip both when neither is needed.)
    overflow = ((s == -math.inf) & torch.isfinite(z)).any(d, keepdim=True)
    # So does a slice whose +inf entries' keys spread so far (beyond exp(-_INF_KEY / 2),
    # already their hard order) that one could fall below a finite entry's key, which
    # would then be taken before it.
    overflow = overflow | ((z == math.inf) & (s < _INF_KEY / 2)).any(d, keepdim=True)
    # a slice with fewer than k present entries takes as many steps as it has entries
    present = (s != -math.inf).sum(d, keepdim=True)
    soft = torch.zeros_like(s)
    for step in range(k):
        a = safe_softmax(s, d)
        soft = soft + (a if step == 0 else torch.where(present > step, a, 0.0))
        if step + 1 < k:
            # Xie & Ermon's update is on the unscaled keys, alpha += log(1 - a), so on the
            # scaled ones s = alpha / tau it is s += log(1 - a) / tau (without the 1 / tau
            # a taken entry comes back level with the next one and the sample never
            # tends to the k-hot one as tau -> 0). At tau = inf the update is 0 (and
            # -inf, an entry with nothing left beside it, stays -inf).
            pen = _log1m_softmax(s, a, d)
            if tau == math.inf:
                pen = torch.where(pen == -math.inf, pen, 0.0)
            elif tau != 1.0:
                pen = pen / tau
            s = s + pen
    if not hard and not traced() and not any_true(overflow):
        return soft.to(logits.dtype)
    sample = _hard_topk(z.detach(), g, d, k)
    soft = torch.where(overflow, sample, soft)
    return _finish(sample if hard else None, soft, hard, logits.dtype)
