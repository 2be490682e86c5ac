"""The native CPU kernels of convex_combination: values, gradients, thread splits,
non-temporal stores, alignment, the ATen fallback, the install-time builds and their
run-time choice of instruction set, threads and forks, and huge-page outputs."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from convexmix._kernels import alloc, cpu, native
from convexmix.errors import ConvexMixWarning
from convexmix.functional import _combine, convex_combination

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang")) and sys.platform != "win32"
needs_native = pytest.mark.skipif(native.library() is None, reason="installed without kernels")


@pytest.fixture(autouse=True)
def _kernels_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small eager calls run composite ATen code; these tests are about the kernels."""
    monkeypatch.setattr(_combine, "_force", "fused")


EPS = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
def test_the_kernels_were_built_at_install_where_a_compiler_is() -> None:
    lib = native.library()
    assert lib is not None
    assert native.lib_path(native.ISAS[0]).exists()
    for suffix in ("f64", "f32", "bf16"):
        assert hasattr(lib, f"cx_fwd_{suffix}")
        assert hasattr(lib, f"cx_bwd_{suffix}")
    assert native.isa() in native.ISAS


def data(
    k: int, n: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=gen).to(dtype) for _ in range(k)]
    w = torch.softmax(torch.randn(k, generator=gen), 0)
    return w.double() if dtype == torch.float64 else w, xs


@pytest.fixture(params=["native", "aten"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native" and native.library() is None:
        pytest.skip("no C compiler")
    if request.param == "aten":
        monkeypatch.setattr(native, "_state", {"lib": None})
    return str(request.param)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("k", "n"), [(1, 1), (2, 63), (3, 64), (5, 65), (4, 3001), (7, 70_001), (20, 4_161)]
)
def test_forward_and_backward_against_float64(
    path: str, dtype: torch.dtype, k: int, n: int
) -> None:
    w, xs = data(k, n, dtype, seed=n)
    xs = [x.requires_grad_() for x in xs]
    wg = w.clone().requires_grad_()
    out = convex_combination(wg, xs)
    assert out.dtype == dtype
    w64, x64 = w.double(), [x.detach().double() for x in xs]
    exact = sum(w64[j] * x64[j] for j in range(k))
    scale = sum(w64[j].abs() * x64[j].abs() for j in range(k))
    acc_eps = EPS[torch.float64 if dtype == torch.float64 else torch.float32]
    # K multiply-adds in the accumulation dtype, then one rounding to the output dtype
    err = (out.double() - exact).abs()
    assert (err <= 2 * (k + 1) * acc_eps * scale + EPS[dtype] * exact.abs()).all()
    g = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, [wg, *xs], g)
    g64 = g.double()
    dots = torch.stack([(g64 * x).sum() for x in x64])
    bound = 20 * acc_eps * torch.stack([(g64 * x).abs().sum() for x in x64]) + 1e-300
    assert ((grads[0].double() - dots).abs() <= bound + EPS[wg.dtype] * dots.abs()).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for j in range(k):  # w_k g in the accumulation dtype, rounded to the input dtype
        assert torch.equal(grads[1 + j], (w[j].to(acc) * g.to(acc)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (2, 65), (3, 70_001), (9, 300_007)])
def test_weights_gradient_alone_against_float64(
    path: str, dtype: torch.dtype, k: int, n: int
) -> None:
    """No input needs a gradient: the native backward takes its blocked dot products
    (blocks of g kept in cache; several blocks and a ragged end here)."""
    w, xs = data(k, n, dtype, seed=n + 1)
    wg = w.clone().requires_grad_()
    out = convex_combination(wg, xs)
    g = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    (grad,) = torch.autograd.grad(out, [wg], g)
    g64, x64 = g.double(), [x.double() for x in xs]
    dots = torch.stack([(g64 * x).sum() for x in x64])
    acc_eps = EPS[torch.float64 if dtype == torch.float64 else torch.float32]
    bound = 20 * acc_eps * torch.stack([(g64 * x).abs().sum() for x in x64]) + 1e-300
    assert ((grad.double() - dots).abs() <= bound + EPS[wg.dtype] * dots.abs()).all()


def test_native_and_aten_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    if native.library() is None:
        pytest.skip("no C compiler")
    w, xs = data(6, 5000, torch.float32)
    out = torch.empty(5000)
    assert cpu.forward(w, xs, out)
    monkeypatch.setattr(native, "_state", {"lib": None})
    assert not cpu.forward(w, xs, torch.empty(5000))
    torch.testing.assert_close(convex_combination(w, xs), out)


@needs_native
def test_thread_split_and_streaming_stores_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    w, xs = data(5, 100_003, torch.float32)
    xs = [x.requires_grad_() for x in xs]
    g = torch.randn(100_003, generator=torch.Generator().manual_seed(2))

    def run() -> tuple[torch.Tensor, ...]:
        wg = w.clone().requires_grad_()
        out = convex_combination(wg, xs)
        return (out, *torch.autograd.grad(out, [wg, *xs], g))

    single = run()
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    monkeypatch.setattr(cpu, "NT_BYTES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three ranges, even on a 2-core machine
    try:
        assert len(cpu.ranges(100_003, 5)) == 3
        split = run()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(split[0], single[0], rtol=0, atol=0)
    # the float partial sums are grouped differently: within the dot products' error bound
    size = torch.stack([(g.double() * x.detach().double()).abs().sum() for x in xs])
    assert ((split[1].double() - single[1].double()).abs() <= 40 * 2.0**-24 * size).all()
    for a, b in zip(split[2:], single[2:], strict=True):
        assert torch.equal(a, b)


@needs_native
def test_misaligned_inputs_and_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "NT_BYTES", 0)  # streaming stores wherever aligned
    base = torch.randn(3, 10_001)
    xs = [base[j, 1:] for j in range(3)]  # contiguous, 4 bytes off a 64-byte line
    w = torch.tensor([0.2, 0.3, 0.5])
    out = torch.empty(10_001)[1:]
    assert out.data_ptr() % 64 != 0
    convex_combination(w, xs, out=out)
    expected = sum(w[j].double() * xs[j].double() for j in range(3))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@needs_native
def test_only_the_needed_input_gradients() -> None:
    w, xs = data(3, 4097, torch.float32)
    xs[1].requires_grad_()
    out = convex_combination(w.requires_grad_(), xs)
    out.backward(torch.ones(4097))
    assert xs[0].grad is None
    assert xs[2].grad is None
    torch.testing.assert_close(xs[1].grad, torch.full((4097,), float(w[1])))


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library is looked up again (the process's choice is put back after)."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("CONVEXMIX_NATIVE", raising=False)
    monkeypatch.delenv("CONVEXMIX_ISA", raising=False)


@pytest.mark.usefixtures("fresh")
def test_installed_without_kernels_it_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(native, "HERE", tmp_path)  # no libconvexmix-*.so there
    with pytest.warns(ConvexMixWarning, match="installed without its native CPU kernels"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # decided once per process
        assert native.isa() is None
        w, xs = data(3, 1000, torch.float32)
        expected = sum(w[j] * xs[j] for j in range(3))
        torch.testing.assert_close(convex_combination(w, xs), expected)


@pytest.mark.usefixtures("fresh")
def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEXMIX_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None


@pytest.mark.usefixtures("fresh")
def test_a_bad_native_setting_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEXMIX_NATIVE", "maybe")
    with pytest.warns(ConvexMixWarning, match=r"CONVEXMIX_NATIVE='maybe' is not 0 or 1"):
        native.library()


@needs_native
@pytest.mark.usefixtures("fresh")
def test_a_build_older_than_its_sources_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    edited = tmp_path / "combine.c"
    edited.write_text(native.SOURCES[0].read_text() + "/* edited */\n")
    monkeypatch.setattr(native, "SOURCES", [edited, *native.SOURCES[1:]])
    with pytest.warns(ConvexMixWarning, match="older than their sources"):
        assert native.library() is None


@needs_native
def test_no_compiler_is_run_and_nothing_written_at_import(tmp_path: Path) -> None:
    # A process with no compiler on PATH and a fresh HOME loads the installed kernels.
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": str(tmp_path / "empty"), "HOME": str(home), "CONVEXMIX_NATIVE": "1"}
    code = (
        "import torch, convexmix as cx; from convexmix._kernels import native; "
        "x = [torch.randn(3_000_000) for _ in range(3)]; "
        "y = cx.functional.convex_combination(torch.tensor([.2, .3, .5]), x); "
        "print(native.isa())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in native.ISAS
    assert "Warning" not in done.stderr, done.stderr
    assert not list(home.iterdir())


def _run_isa(monkeypatch: pytest.MonkeyPatch, isa: str) -> str | None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CONVEXMIX_ISA", isa)
    return native.isa()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_baseline_and_widest_builds_match_aten(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    w, xs = data(5, 10_007, dtype, seed=3)
    g = torch.randn(10_007, generator=torch.Generator().manual_seed(4)).to(dtype)

    def run() -> tuple[torch.Tensor, ...]:
        wg = w.clone().requires_grad_()
        xg = [x.clone().requires_grad_() for x in xs]
        out = convex_combination(wg, xg)
        return (out, *torch.autograd.grad(out, [wg, *xg], g))

    results = {}
    for isa in ("baseline", "widest"):
        results[isa] = (_run_isa(monkeypatch, isa), run())
    monkeypatch.setattr(native, "_state", {"lib": None})  # the ATen loop
    aten = run()
    assert results["baseline"][0] == native.ISAS[0]
    supported = [name for name in native.ISAS if _supported(name)]
    assert results["widest"][0] == supported[-1]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
    for isa, (_, got) in results.items():
        for a, b in zip(got, aten, strict=True):
            torch.testing.assert_close(
                a.double(), b.double(), rtol=tol[dtype], atol=tol[dtype], msg=isa
            )


def _supported(isa: str) -> bool:
    """From /proc/cpuinfo's flags, independently of the library's cpuid check."""
    if isa in ("x86-64", "aarch64", "generic"):
        return True
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if isa == "avx2":
        return avx2
    return avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags


@needs_native
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_each_build_the_cpu_supports_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    for isa in native.ISAS:
        if _supported(isa):
            assert _run_isa(monkeypatch, isa) == isa
            w, xs = data(3, 5000, torch.float32)
            out = convex_combination(w, xs)
            torch.testing.assert_close(out, sum(w[j] * xs[j] for j in range(3)))
        else:  # never loaded: a warning and the widest build that runs here
            with pytest.warns(ConvexMixWarning, match="this CPU cannot run that build"):
                chosen = _run_isa(monkeypatch, isa)
            assert chosen is not None
            assert _supported(chosen)


@needs_native
def test_an_unknown_isa_name_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.warns(ConvexMixWarning, match=r"CONVEXMIX_ISA='sse9' is not one of"):
        assert _run_isa(monkeypatch, "sse9") in native.ISAS


@needs_native
def test_four_threads_fifty_calls_each_match_a_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)  # every call splits over the pool too
    monkeypatch.setattr(native, "_pool", None)  # created by the racing threads
    sizes = [1000, 70_001, 200_000]
    cases = [data(3 + i, n, torch.float32, seed=i) for i, n in enumerate(sizes)]
    refs = [sum(w[j].double() * xs[j].double() for j in range(len(xs))) for w, xs in cases]
    failures: list[str] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for i in range(50):
            c = (t + i) % len(cases)
            w, xs = cases[c]
            out = convex_combination(w, xs)
            if not torch.allclose(out.double(), refs[c], rtol=1e-5, atol=1e-5):
                failures.append(f"thread {t} call {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures
    assert native._pool is not None


def _child() -> None:
    faulthandler.dump_traceback_later(50, exit=True)
    w, xs = data(3, 400_000, torch.float32)
    out = convex_combination(w, xs)
    # checked on a slice: torch's own OpenMP team is not fork-safe after the parent used
    # it, and small ops stay on one thread
    expected = sum(w[j] * xs[j][-1000:] for j in range(3))
    sys.exit(0 if torch.allclose(out[-1000:], expected, atol=1e-6) else 1)


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_gets_its_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no pool")
    w, xs = data(3, 400_000, torch.float32)
    convex_combination(w, xs)  # the parent's pool now exists
    assert native._pool is not None
    proc = mp.get_context("fork").Process(target=_child)
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert proc.exitcode == 0


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
    reason="no transparent huge pages",
)
def test_large_outputs_are_advised_onto_huge_pages() -> None:
    # Whether the kernel then finds free 2 MiB pages depends on the machine's memory
    # fragmentation, so the test checks the advice ("hg" in VmFlags), not the pages.
    out = alloc.empty((8 << 20,), torch.float32)  # 32 MiB
    assert out.shape == (8 << 20,)
    assert out.dtype == torch.float32
    assert "hg" in _vm_flags(out.data_ptr() + (16 << 20))
    out.fill_(1.0)
    assert torch.all(out == 1.0)
    small = alloc.empty((1000,), torch.float64)
    assert small.shape == (1000,)
    assert small.dtype == torch.float64
