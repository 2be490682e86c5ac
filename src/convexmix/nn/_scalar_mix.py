"""``ScalarMix``: ELMo/AllenNLP's learned mix of layers (private module; ``cx.nn`` and ``cx``
export it)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from convexmix._validation import compute_dtype
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional import convex_combination
from convexmix.nn._init import Init
from convexmix.nn._inputs import count_inputs
from convexmix.nn._simplex_weights import SimplexWeights

__all__ = ["ScalarMix"]


class _CenteredMix(torch.autograd.Function):
    r""":math:`\sum_k a_k (h_k - m_k)`, ``a`` and ``m`` of shape ``(K, *S)`` broadcasting
    against each ``h_k``: the layer-normalised mix. Each layer is centred before it is
    scaled, in float32 or wider, layer by layer into one accumulator (one scratch buffer,
    no normalised copy of any layer). Folding the means into one offset,
    ``sum_k a_k h_k - sum_k a_k m_k``, cancels: at layers of mean 1e3 and std 1e-2 it lost
    two digits in float32, and constant tokens (``a = 1e6``) gave 0.125 instead of 0.
    The backward recomputes ``h_k - m_k`` from the saved layers."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, m: Tensor, *xs: Tensor) -> Tensor:
        acc = torch.promote_types(compute_dtype(xs[0].dtype), a.dtype)
        out = torch.zeros(xs[0].shape, dtype=acc, device=xs[0].device)
        tmp = torch.empty_like(out)
        for k, x in enumerate(xs):
            out.addcmul_(torch.sub(x, m[k], out=tmp), a[k])
        ctx.save_for_backward(a, m, *xs)
        return out.to(xs[0].dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, m, *xs = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.to(a.dtype)
        ga = torch.zeros_like(a) if need[0] else None
        gm = torch.zeros_like(m) if need[1] else None
        gxs: list[Tensor | None] = []
        for k, x in enumerate(xs):
            gxs.append((g * a[k]).to(x.dtype) if need[2 + k] else None)
            if ga is not None:
                ga[k] = (g * (x - m[k])).sum_to_size(a[k].shape)
            if gm is not None:
                gm[k] = -(a[k] * g).sum_to_size(m[k].shape)
        return (ga, gm, *gxs)


LayerNorm = bool | str


class ScalarMix(nn.Module):
    r"""ELMo/AllenNLP scalar mix of layers: :math:`\gamma \sum_k s_k h_k`, ``s = softmax(w)``.

    Same output as AllenNLP's ``ScalarMix`` for the same parameters. ``layer_norm=True``
    (needs ``mask`` ``(B, T)``) normalises each layer with the mean and variance of its
    unmasked elements, ``(h - mean) / sqrt(var + 1e-12)``; ``layer_norm="token"``
    normalises each token over the last dimension. Each layer is centred, scaled and
    added into one accumulator (float32 for half inputs), so no normalised copy of any
    layer is made. An all-False mask gives zeros.

    Args:
        num_layers: the number of layers mixed.
        gamma: learn a scalar scale (initial value 1.0, or the float given); False: none.
        layer_norm: False, True (AllenNLP's masked per-layer norm) or ``"token"``.
        init: probabilities of the layers (never logits); None = uniform.
        trainable: False freezes the weights and gamma.
        layer_dropout: in training mode, drop each layer with this probability (masked
            before the softmax, then renormalised); never all of them.
        temperature: softmax temperature.

    Example:
        >>> import torch, convexmix as cx
        >>> mix = cx.ScalarMix(3, init=[0.2, 0.3, 0.5])
        >>> layers = [torch.full((2, 4), float(k)) for k in range(3)]  # e.g. hidden_states
        >>> mix(layers)[0]
        tensor([1.3000, 1.3000, 1.3000, 1.3000], grad_fn=<SelectBackward0>)
        >>> mix.weights
        tensor([0.2000, 0.3000, 0.5000], grad_fn=<...>)
    """

    def __init__(
        self,
        num_layers: int,
        *,
        gamma: bool | float = True,
        layer_norm: LayerNorm = False,
        init: Init | None = None,
        trainable: bool = True,
        layer_dropout: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if layer_norm not in (False, True, "token"):
            raise ConvexMixError(f"layer_norm must be False, True or 'token'; got {layer_norm!r}.")
        if not (isinstance(layer_dropout, (int, float)) and 0.0 <= layer_dropout < 1.0):
            raise ConvexMixError(f"layer_dropout must be in [0, 1); got {layer_dropout!r}.")
        self.mix = SimplexWeights(
            num_layers,
            map="softmax",
            init="uniform" if init is None else init,
            temperature=temperature,
        )
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.layer_dropout = float(layer_dropout)
        if gamma is False:
            self.register_parameter("gamma", None)
        else:
            value = 1.0 if gamma is True else float(gamma)
            self.gamma = nn.Parameter(torch.tensor(value))
        self.requires_grad_(trainable)

    @property
    def weights(self) -> Tensor:
        """The current layer weights ``s`` (without gamma), ``(num_layers,)``."""
        return self.mix.weights

    def forward(self, tensors: Sequence[Tensor] | Tensor, mask: Tensor | None = None) -> Tensor:
        """Mix ``num_layers`` same-shape tensors ``(B, T, D)`` (any shape without layer norm)."""
        count = count_inputs(tensors)
        if count != self.num_layers:
            raise ShapeError(f"ScalarMix expects {self.num_layers} layers; got {count}.")
        xs = list(tensors.unbind(0) if isinstance(tensors, Tensor) else tensors)
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise ShapeError(f"all layers must have the same shape; got {sorted(shapes)}.")
        w = self.mix(mask=self._dropout_mask(xs[0].device))
        if self.gamma is not None:
            w = w * self.gamma
        if self.layer_norm is False:
            return convex_combination(w, xs)
        scale, offset = self._norm_stats(xs, mask)
        a = w.reshape(-1, *[1] * (scale.dim() - 1)).to(scale.dtype) * scale
        out: Tensor = _CenteredMix.apply(a, offset, *xs)  # type: ignore[no-untyped-call]
        return out

    def _dropout_mask(self, device: torch.device) -> Tensor | None:
        if not (self.training and self.layer_dropout > 0):
            return None
        keep = torch.rand(self.num_layers, device=device) >= self.layer_dropout
        if not bool(keep.any()):
            keep[torch.randint(self.num_layers, (), device=device)] = True
        return keep

    def _norm_stats(self, xs: list[Tensor], mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per layer ``1/std`` and ``mean``: scalars (AllenNLP) or per token ``(B, T, 1)``."""
        eps = 1e-12
        acc = compute_dtype(xs[0].dtype)  # 1e-12 and 1/std underflow/overflow in half
        if self.layer_norm == "token":
            stats = [torch.var_mean(x.to(acc), dim=-1, keepdim=True, correction=0) for x in xs]
            inv = torch.stack([(v + eps).rsqrt() for v, _ in stats])
            return inv, torch.stack([m for _, m in stats])
        x0 = xs[0]
        if mask is None or x0.dim() != 3 or mask.shape != x0.shape[:2]:
            got = None if mask is None else tuple(mask.shape)
            raise ShapeError(
                "layer_norm=True needs layers of shape (B, T, D) and mask of shape (B, T); "
                f"got layers {tuple(x0.shape)} and mask {got}."
            )
        m = mask.to(acc).unsqueeze(-1)
        count = m.sum() * x0.shape[-1]
        # An all-False mask: no element to normalise by; those layers count 0 (zeros out).
        anything = count > 0
        count = count.clamp_min(1)
        means, invs = [], []
        for x in xs:
            xm = x.to(acc) * m
            mean = xm.sum() / count
            centred = (xm - mean) * m
            # one correction step: the rounding of the first sum is taken back, so that a
            # constant layer has its exact mean (and gives zeros, not rounding / 1e-6)
            mean = mean + centred.sum() / count
            var = ((xm - mean) * m).square().sum() / count
            means.append(mean)
            invs.append(torch.where(anything, (var + eps).rsqrt(), 0.0))
        return torch.stack(invs), torch.stack(means)

    @classmethod
    def from_allennlp(cls, state_dict: Mapping[str, Tensor], **kwargs: Any) -> ScalarMix:
        """Build from an AllenNLP ``ScalarMix`` state_dict (``scalar_parameters.{i}``, ``gamma``).

        Keys may carry a common prefix (e.g. ``"encoder.scalar_mix."``); ``kwargs`` go to
        the constructor (e.g. ``layer_norm=True``), all but ``init``. The checkpoint's
        scalars become the free values as they are (in the default dtype, like every
        parameter; exact for a float32 checkpoint), not through their probabilities: the
        weights are ``softmax`` of the very same numbers, so after ``.double()`` they match
        AllenNLP's formula evaluated in float64 on the checkpoint's values. With a
        ``temperature`` T the free values are ``T`` times the scalars.

        Example:
            >>> import torch, convexmix as cx
            >>> sd = {"scalar_parameters.0": torch.tensor([0.5]),
            ...       "scalar_parameters.1": torch.tensor([-0.5]), "gamma": torch.tensor([2.0])}
            >>> mix = cx.ScalarMix.from_allennlp(sd)
            >>> mix.mix.free.detach(), mix.gamma.detach()  # the checkpoint's values
            (tensor([ 0.5000, -0.5000]), tensor(2.))
            >>> mix.weights  # softmax([0.5, -0.5])
            tensor([0.7311, 0.2689], grad_fn=<...>)
        """
        if "init" in kwargs:
            raise ConvexMixError(
                "from_allennlp takes the weights from the checkpoint; got init= as well."
            )
        found: dict[str, dict[int, Tensor]] = {}
        for key, value in state_dict.items():
            match = re.fullmatch(r"(.*)scalar_parameters\.(\d+)", key)
            if match:
                found.setdefault(match.group(1), {})[int(match.group(2))] = value
        if len(found) != 1:
            raise ConvexMixError(
                "expected the keys of one AllenNLP ScalarMix (scalar_parameters.0, ..., gamma); "
                f"found {len(found)} sets of scalar_parameters in keys {sorted(state_dict)[:8]}."
            )
        prefix, params = next(iter(found.items()))
        n = len(params)
        if sorted(params) != list(range(n)):
            raise ConvexMixError(
                f"scalar_parameters must be numbered 0..{n - 1}; got {sorted(params)}."
            )
        values = [params[i] for i in range(n)]
        if not all(isinstance(v, Tensor) and v.numel() == 1 for v in values):
            raise ConvexMixError("each scalar_parameters.{i} must be a tensor of one element.")
        scalars = torch.cat([v.detach().reshape(1).cpu() for v in values])
        if not bool(scalars.isfinite().all()):
            raise ConvexMixError(f"scalar_parameters must be finite; got {scalars.tolist()}.")
        kwargs.setdefault("gamma", True)
        mix = cls(n, **kwargs)
        with torch.no_grad():
            free = mix.mix.free
            t = mix.mix.simplex.temperature
            free.copy_(scalars.to(free.dtype) if t == 1.0 else scalars.double() * t)
            gamma_key = prefix + "gamma"
            if gamma_key in state_dict and mix.gamma is not None:
                mix.gamma.copy_(state_dict[gamma_key].detach().reshape(()))
        return mix

    def extra_repr(self) -> str:
        parts = [f"num_layers={self.num_layers}", f"gamma={self.gamma is not None}"]
        if self.layer_norm is not False:
            parts.append(f"layer_norm={self.layer_norm!r}")
        if self.layer_dropout:
            parts.append(f"layer_dropout={self.layer_dropout}")
        return ", ".join(parts)
