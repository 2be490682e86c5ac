"""The Triton kernels of convex_combination: on CUDA where there is one, and in Triton's
CPU interpreter (TRITON_INTERPRET=1 with CONVEXMIX_TRITON_INTERPRET=1, a subprocess)
everywhere Triton has a wheel: the test extras install it there, so the interpreter test
fails rather than skips when it is missing."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from convexmix.functional import convex_combination

HAS_TRITON = importlib.util.find_spec("triton") is not None
#: Where PyPI has Triton wheels (the test extra's marker).
TRITON_WHEEL = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="no CUDA GPU")

SCRIPT = textwrap.dedent(
    """
    import torch
    from convexmix._kernels import gpu
    from convexmix.functional import _combine, convex_combination

    _combine._force = "fused"  # small calls would run composite ATen code, not the kernels
    used = []
    fwd, bwd = gpu.forward, gpu.backward
    gpu.forward = lambda *a: used.append("fwd") or fwd(*a)
    gpu.backward = lambda *a: used.append("bwd") or bwd(*a)
    ulp = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
    for dtype in ulp:
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(2500, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
        w = torch.softmax(torch.randn(3, generator=gen), 0).to(
            torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        out = convex_combination(w, xs)
        x64 = [x.detach().double() for x in xs]
        exact = sum(w[j].detach().double() * x64[j] for j in range(3))
        # the interpreter rounds to bfloat16 by truncation: up to one ulp
        size = sum(w[j].detach().double().abs() * x64[j].abs() for j in range(3))
        assert ((out.double() - exact).abs() <= 4 * ulp[dtype] * size).all(), dtype
        g = torch.randn(2500, generator=gen).to(dtype)
        gw, *gx = torch.autograd.grad(out, [w, *xs], g)
        dots = torch.stack([(g.double() * x).sum() for x in x64])
        scale = torch.stack([(g.double() * x).abs().sum() for x in x64])
        assert ((gw.double() - dots).abs() <= 64 * 2.0**-24 * scale).all(), (gw, dots)
        for j in range(3):
            ref = w[j].detach().double() * g.double()
            assert ((gx[j].double() - ref).abs() <= ulp[dtype] * ref.abs()).all()
    assert used.count("fwd") == 3 and used.count("bwd") == 3, used
    print("ok")
    """
)


@pytest.mark.skipif(not (HAS_TRITON or TRITON_WHEEL), reason="no Triton wheel for this platform")
def test_triton_kernels_in_the_interpreter() -> None:
    assert HAS_TRITON, "Triton has a wheel here: pip install -e '.[test]' installs it"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CONVEXMIX_TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


ORDINARY = textwrap.dedent(
    """
    import torch
    from convexmix._kernels import gpu
    from convexmix.functional import _combine, convex_combination

    _combine._force = "fused"  # the kernels, not the composite code of small calls
    used = []
    fwd = gpu.forward
    gpu.forward = lambda *a: used.append(fwd(*a))
    xs = [torch.randn(1000) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(convex_combination(w, xs), sum(w[k] * xs[k] for k in range(3)))
    assert used == [False], used  # asked, and declined: CPU tensors are not Triton's
    assert not gpu._INTERPRET
    print("ok")
    """
)


def test_triton_interpret_alone_does_not_reroute_cpu_calls() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("CONVEXMIX_TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", ORDINARY], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_float64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(100_003, generator=gen).to(dtype) for _ in range(5)]
    w = torch.softmax(torch.randn(5, generator=gen), 0)
    w = w.double() if dtype == torch.float64 else w
    wc = w.cuda().requires_grad_()
    xc = [x.cuda().requires_grad_() for x in xs]
    out = convex_combination(wc, xc)
    exact = sum(w[j].double() * xs[j].double() for j in range(5))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    torch.testing.assert_close(out.cpu().double(), exact, rtol=tol[dtype], atol=tol[dtype])
    g = torch.randn(100_003, generator=gen).to(dtype)
    gw, *gx = torch.autograd.grad(out, [wc, *xc], g.cuda())
    dots = torch.stack([(g.double() * x.double()).sum() for x in xs])
    torch.testing.assert_close(gw.cpu().double(), dots, rtol=1e-4, atol=1e-3)
    for j in range(5):
        ref = w[j].double() * g.double()
        torch.testing.assert_close(gx[j].cpu().double(), ref, rtol=tol[dtype], atol=0)


@cuda
def test_cuda_compile_fullgraph() -> None:
    xs = [torch.randn(4096, device="cuda") for _ in range(3)]
    w = torch.softmax(torch.randn(3, device="cuda"), 0)
    f = torch.compile(convex_combination, fullgraph=True)
    torch.testing.assert_close(f(w, xs), convex_combination(w, xs))
