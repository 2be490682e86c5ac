"""The simplex maps against independent references, their gradients and their edge cases."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.distributions.transforms import StickBreakingTransform

import convexmix as cx
from convexmix.functional import entmax, entmax15, softmax, sparsemax, stick_breaking
from tests.reference import (
    apply_rows,
    entmax_bisect_ref,
    projection_bruteforce,
    softmax_ref,
)

F = cx.functional
Map = Callable[..., torch.Tensor]


def entmax13(x: torch.Tensor, dim: int = -1, **kw: object) -> torch.Tensor:
    return entmax(x, 1.3, dim, **kw)  # type: ignore[arg-type]


def sticky(x: torch.Tensor, dim: int = -1, **kw: object) -> torch.Tensor:
    """stick_breaking on all but one entry, so that it maps K -> K like the others."""
    return stick_breaking(x.narrow(dim, 0, x.shape[dim] - 1), dim, **kw)  # type: ignore[arg-type]


MAPS: dict[str, Map] = {
    "softmax": softmax,
    "sparsemax": sparsemax,
    "entmax15": entmax15,
    "entmax13": entmax13,
    "stick_breaking": sticky,
}


def g64(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# ------------------------------------------------------------------- references


@pytest.mark.parametrize("total", [1.0, 2.5])
def test_softmax_matches_torch(total: float) -> None:
    x = g64(5, 7)
    torch.testing.assert_close(softmax(x, total=total), total * torch.softmax(x, -1))
    torch.testing.assert_close(softmax(x, 0, temperature=0.5), torch.softmax(x / 0.5, 0))


@pytest.mark.parametrize("total", [1.0, 0.3, 4.0])
def test_sparsemax_is_bruteforce_projection(total: float) -> None:
    x = g64(40, 6, seed=1, scale=0.7)
    ref = apply_rows(projection_bruteforce, x.numpy(), total)
    torch.testing.assert_close(sparsemax(x, total=total).numpy(), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("total", [1.0, 3.0])
def test_entmax15_matches_independent_bisection(total: float) -> None:
    x = g64(30, 9, seed=2, scale=2.0)
    ref = apply_rows(entmax_bisect_ref, x.numpy(), 1.5, total)
    torch.testing.assert_close(entmax15(x, total=total).numpy(), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.5, 2.0, 3.0])
def test_entmax_bisection_matches_reference(alpha: float) -> None:
    x = g64(20, 8, seed=3)
    ref = apply_rows(entmax_bisect_ref, x.numpy(), alpha)
    torch.testing.assert_close(entmax(x, alpha).numpy(), ref, atol=1e-10, rtol=0)


def test_entmax_special_cases_agree() -> None:
    x = g64(10, 12, seed=4)
    torch.testing.assert_close(entmax(x, 2.0, n_iter=60), sparsemax(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax(x, 1.5, n_iter=60), entmax15(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax(x, 1.0), softmax(x))
    # alpha -> 1 approaches the softmax.
    torch.testing.assert_close(entmax(x, 1.0001), softmax(x), atol=1e-3, rtol=0)


def test_entmax_per_row_alpha() -> None:
    x = g64(3, 6, seed=5)
    alpha = torch.tensor([[1.2], [1.5], [2.0]], dtype=torch.float64)
    out = entmax(x, alpha)
    for i in range(3):
        torch.testing.assert_close(out[i], entmax(x[i], float(alpha[i, 0])))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, -1])
def test_stick_breaking_eager_gradient_equals_the_composite_one(
    dtype: torch.dtype, dim: int
) -> None:
    """The eager closed-form backward against autograd through the composite form (the
    one torch.func runs), with masks (an all-absent slice included), total != 1 and
    saturated inputs (+-1e4, +-inf)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 6, generator=gen, dtype=torch.float64) * 3
    z[1, 2], z[2, 0], z[3, 4], z[4, 1] = 1e4, -1e4, float("inf"), -float("inf")
    z = z.to(dtype)
    mask = torch.rand(5, 7, generator=gen) > 0.3
    mask[0] = False
    g = torch.randn(5, 7, generator=gen, dtype=dtype)
    if dim == 0:
        z, mask, g = z.T.contiguous(), mask.T.contiguous(), g.T.contiguous()
    for m in (None, mask):
        for total in (1.0, 2.5):

            def loss(
                t: torch.Tensor, m: torch.Tensor | None = m, total: float = total
            ) -> torch.Tensor:
                return (stick_breaking(t, dim, mask=m, total=total) * g).sum()

            zg = z.clone().requires_grad_()
            (eager,) = torch.autograd.grad(loss(zg), zg)
            composite = torch.func.grad(loss)(z)
            assert eager.dtype == dtype
            assert eager.isfinite().all()
            torch.testing.assert_close(eager, composite)


@pytest.mark.parametrize("k", [1, 2, 5, 30])
def test_stick_breaking_matches_torch_transform(k: int) -> None:
    z = g64(4, k - 1, seed=6, scale=2.0)
    torch.testing.assert_close(stick_breaking(z), StickBreakingTransform()(z))
    p = stick_breaking(z)
    torch.testing.assert_close(F.stick_breaking_inverse(p), StickBreakingTransform().inv(p))
    torch.testing.assert_close(stick_breaking(F.stick_breaking_inverse(p)), p)


def test_stick_breaking_zeros_give_uniform_and_total() -> None:
    torch.testing.assert_close(stick_breaking(torch.zeros(2, 4)), torch.full((2, 5), 0.2))
    torch.testing.assert_close(stick_breaking(torch.zeros(3), total=2.0), torch.full((4,), 0.5))
    z = g64(3, 4)
    torch.testing.assert_close(F.stick_breaking_inverse(stick_breaking(z, total=3.0), total=3.0), z)


def test_stick_breaking_extreme_inputs_stay_finite() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [-math.inf, 0.0, 0.0]])
    p = stick_breaking(z)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    torch.testing.assert_close(p[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(p[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))


# ----------------------------------------------------------------- dims and masks


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_any_dim_equals_last_dim(name: str, dim: int) -> None:
    f = MAPS[name]
    x = g64(4, 5, 6, seed=7)
    expected = f(x.movedim(dim, -1), -1).movedim(-1, dim)
    torch.testing.assert_close(f(x, dim), expected)


@pytest.mark.parametrize("name", list(MAPS))
def test_mask_equals_map_restricted_to_present(name: str) -> None:
    f = MAPS[name]
    x = g64(6, 7, seed=8)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 7, generator=gen) > 0.4
    mask[:, 0] = True
    if name == "stick_breaking":  # the mask applies to the K outputs: conditioning
        full = f(x)
        expected = full * mask / (full * mask).sum(-1, keepdim=True)
    else:
        expected = torch.stack([_restricted(f, x[i], mask[i]) for i in range(6)])
    out = f(x, mask=mask)
    torch.testing.assert_close(out, expected)
    assert (out[~mask] == 0).all()


def _restricted(f: Map, row: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(row)
    out[present] = f(row[present])
    return out


@pytest.mark.parametrize("name", list(MAPS))
def test_all_masked_rows_are_zero_with_finite_zero_grads(name: str) -> None:
    f = MAPS[name]
    x = g64(3, 5, seed=9).requires_grad_()
    mask = torch.tensor([[False] * 5, [True, False, True, True, False], [False] * 5])
    out = f(x, mask=mask, total=2.0)
    assert (out[0] == 0).all()
    assert (out[2] == 0).all()
    torch.testing.assert_close(out[1].sum(), torch.tensor(2.0, dtype=torch.float64))
    (out * g64(3, 5, seed=10)).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all()
    assert (x.grad[2] == 0).all()
    if name != "stick_breaking":  # there the mask is on the outputs, every z_i still counts
        assert (x.grad[1][~mask[1]] == 0).all()


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15", "entmax13"])
def test_all_minus_inf_row_is_zero(name: str) -> None:
    x = torch.full((2, 4), -math.inf)
    x[1, 2] = 0.5
    out = MAPS[name](x)
    torch.testing.assert_close(out, torch.tensor([[0.0] * 4, [0.0, 0.0, 1.0, 0.0]]))


def test_mask_broadcasts() -> None:
    x = g64(4, 3)
    mask = torch.tensor([True, False, True])
    out = softmax(x, mask=mask)
    assert (out[:, 1] == 0).all()
    col = torch.tensor([[True], [False], [True], [True]])
    assert (sparsemax(x, mask=col)[1] == 0).all()


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("total", [1.0, 1.7])
def test_gradcheck(name: str, dim: int, total: float) -> None:
    f = MAPS[name]
    x = g64(3, 4, 5, seed=11, scale=0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: f(t, dim, total=total), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(MAPS))
def test_gradcheck_with_mask(name: str) -> None:
    f = MAPS[name]
    x = g64(4, 6, seed=12, scale=0.5).requires_grad_()
    mask = torch.tensor([True, True, False, True, False, True])
    assert torch.autograd.gradcheck(lambda t: f(t, mask=mask), (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_entmax_alpha() -> None:
    x = g64(3, 6, seed=13).requires_grad_()
    alpha = torch.tensor([[1.2], [1.6], [2.4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, a: entmax(t, a, n_iter=80, total=1.5), (x, alpha), eps=1e-6, atol=1e-6
    )
    scalar = torch.tensor(1.35, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: entmax(x.detach(), a, n_iter=80), (scalar,))


def test_sparsemax_jacobian_closed_form() -> None:
    x = g64(7, seed=14)
    p = sparsemax(x)
    s = (p > 0).double()
    expected = torch.diag(s) - torch.outer(s, s) / s.sum()
    torch.testing.assert_close(torch.func.jacrev(sparsemax)(x), expected)


def test_entmax15_jacobian_closed_form() -> None:
    x = g64(7, seed=15)
    g = entmax15(x).sqrt()
    expected = torch.diag(g) - torch.outer(g, g) / g.sum()
    torch.testing.assert_close(torch.func.jacrev(entmax15)(x), expected)


def test_softmax_jacobian_closed_form() -> None:
    x = g64(5, seed=16)
    p = softmax(x)
    torch.testing.assert_close(torch.func.jacrev(softmax)(x), torch.diag(p) - torch.outer(p, p))


@pytest.mark.parametrize("name", list(MAPS))
def test_vmap_matches_loop(name: str) -> None:
    f = MAPS[name]
    x = g64(4, 3, 6, seed=17)
    torch.testing.assert_close(torch.func.vmap(f)(x), torch.stack([f(r) for r in x]))
    torch.testing.assert_close(
        torch.func.vmap(lambda r: f(r, 0), in_dims=1)(x), f(x, 0).movedim(1, 0)
    )


def test_vmap_entmax_batched_alpha() -> None:
    x = g64(3, 5, seed=18)
    alpha = torch.tensor([1.2, 1.5, 2.0], dtype=torch.float64)
    out = torch.func.vmap(entmax)(x, alpha)
    torch.testing.assert_close(out, torch.stack([entmax(x[i], float(alpha[i])) for i in range(3)]))


def test_needs_input_grad_is_honoured() -> None:
    x = g64(3, 4, seed=19).requires_grad_()
    alpha = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    entmax(x, alpha.detach()).sum().backward()
    assert x.grad is not None
    assert alpha.grad is None
    x.grad = None
    entmax(x.detach(), alpha).pow(2).sum().backward()
    assert alpha.grad is not None
    assert x.grad is None


# ------------------------------------------------------------------------ precision


@pytest.mark.parametrize("name", list(MAPS))
def test_float32_sum_error_at_k_100000(name: str) -> None:
    f = MAPS[name]
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(4, 100_000, generator=gen)
    for scale in (1.0, 1e-3, 30.0):
        err = (f(x * scale).double().sum(-1) - 1).abs().max().item()
        assert err <= 2e-5, (scale, err)


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    f = MAPS[name]
    x = torch.randn(5, 9).to(dtype)
    out = f(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, f(x.float()).to(dtype), atol=0, rtol=0)


def test_float64_is_exact() -> None:
    x = g64(50, 20, seed=21, scale=5.0)
    for name, f in MAPS.items():
        err = (f(x).sum(-1) - 1).abs().max().item()
        assert err <= 64 * torch.finfo(torch.float64).eps, (name, err)


@pytest.mark.parametrize("name", list(MAPS))
def test_extreme_logits(name: str) -> None:
    f = MAPS[name]
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, 1e4, 1e4]])
    x.requires_grad_()
    out = f(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(3))
    out[:, 0].sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------- compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_all_maps(backend: str) -> None:
    def all_maps(x: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return (
            softmax(x, temperature=0.7, mask=mask, total=2.0)
            + sparsemax(x, mask=mask)
            + entmax15(x, 0)
            + entmax(x, alpha, mask=mask)
            + stick_breaking(x[..., :-1], mask=mask)
        )

    compiled = torch.compile(all_maps, fullgraph=True, backend=backend)
    x = torch.randn(3, 5, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    alpha = torch.tensor(1.4, requires_grad=True)
    out = compiled(x, mask, alpha)
    torch.testing.assert_close(out, all_maps(x, mask, alpha))
    out.sum().backward()
    assert x.grad is not None
    assert alpha.grad is not None


# ------------------------------------------------------------------------ errors


def test_errors_say_what_was_expected_and_given() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(cx.ShapeError, match=r"dim=2 is out of range for x of shape \(3, 4\)"):
        softmax(x, dim=2)
    with pytest.raises(cx.ConvexMixError, match=r"must be a torch.Tensor; got list"):
        sparsemax([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixError, match=r"floating-point tensor; got dtype torch.int64"):
        entmax15(torch.arange(3))
    with pytest.raises(cx.ConvexMixError, match=r"total must be finite and > 0; got -1.0"):
        softmax(x, total=-1.0)
    with pytest.raises(
        cx.ConvexMixError, match=r"mask must be a bool tensor.*got dtype torch.float32"
    ):
        softmax(x, mask=torch.ones(3, 4))
    with pytest.raises(
        cx.ShapeError, match=r"mask of shape \(5,\) does not broadcast to x of shape"
    ):
        sparsemax(x, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(cx.ConvexMixError, match=r"alpha must be finite and >= 1; got 0.5"):
        entmax(x, 0.5)
    with pytest.raises(cx.ConvexMixError, match=r"alpha must be > 1"):
        entmax(x, torch.tensor(0.9))
    with pytest.raises(cx.ShapeError, match=r"alpha of shape \(4,\) must broadcast to \(3, 1\)"):
        entmax(x, torch.full((4,), 1.5))
    with pytest.raises(cx.ConvexMixError, match=r"n_iter must be an int >= 1; got 0"):
        entmax(x, 1.5, n_iter=0)
    with pytest.raises(cx.ConvexMixError, match=r"temperature must be finite and > 0; got 0.0"):
        softmax(x, temperature=0.0)
    with pytest.raises(cx.ShapeError, match=r"at least one dimension"):
        softmax(torch.tensor(1.0))
    assert issubclass(cx.ConvexMixError, ValueError)


def test_reference_helpers_self_check() -> None:
    """The references agree with each other where they overlap (alpha = 2 is the projection)."""
    x = np.array([0.3, -0.2, 1.1, 0.4])
    np.testing.assert_allclose(entmax_bisect_ref(x, 2.0), projection_bruteforce(x), atol=1e-12)
    np.testing.assert_allclose(softmax_ref(x).sum(), 1.0)


# ------------------------------------------------------------- the peer library


def test_agrees_with_entmax_package_values_and_gradients() -> None:
    peer = pytest.importorskip("entmax")
    x = g64(6, 9, seed=30, scale=1.5).requires_grad_()
    alpha = torch.tensor([[1.2], [1.4], [1.6], [1.8], [2.0], [2.5]], dtype=torch.float64)
    alpha.requires_grad_()
    g = g64(6, 9, seed=31)
    pairs = [
        (sparsemax(x), peer.sparsemax(x, -1)),
        (entmax15(x), peer.entmax15(x, -1)),
        (entmax(x, alpha, n_iter=60), peer.entmax_bisect(x, alpha, -1, n_iter=60)),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
        grads = torch.autograd.grad((ours * g).sum(), [x, alpha], allow_unused=True)
        peer_grads = torch.autograd.grad((theirs * g).sum(), [x, alpha], allow_unused=True)
        for a, b in zip(grads, peer_grads, strict=True):
            if a is not None and b is not None:
                torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
