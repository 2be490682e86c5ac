"""convexmix now against convexmix at an earlier commit, in one process, case by case.

    python benchmarks/bench_before_after.py --ref 71c0e5f [--rounds 9] [--only TEXT ...]

A change that only moves code (a restructure) must not make any call slower. Timing two
versions in two processes compares the processes as much as the code: on a shared
machine the same case moves by 10-15% between processes (page placement, the allocator's
state, the load). Here both versions run in the same process: the package at ``--ref``
is extracted with ``git archive``, renamed ``convexmix_before`` (its imports and its
custom ops' namespace with it) and imported beside ``convexmix``, with its own native
kernels (this checkout's build when the C sources are the same, else built from the
ref's sources). Each case is timed as interleaved pairs (a ~1 ms batch of the
old version's calls, then one of the new one's, and again), best of at least
``--rounds`` rounds, and the ratio after / before is printed (below 1: faster now).

The cases: ``bench_overhead.py``'s grid (``WeightedSum(K)`` forward and backward, the
per-call floor, ``ScalarMix``, the maps at (1, 8) and (256, 8), ``SimplexWeights``,
``simplex_``, ``project_simplex``) and ``bench_combine.py``'s sizes for
``convex_combination`` (K in {2, 8, 32}, N in {1e5, 1e6, 2^22}; forward, and forward +
backward for the weights, and for the weights and the inputs).
"""

from __future__ import annotations

import argparse
import importlib
import io
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from bench_overhead import pair

ROOT = Path(__file__).resolve().parent.parent
Fn = Callable[[], object]


def load_before(ref: str, into: Path) -> ModuleType:
    """The package at ``ref`` as ``convexmix_before``, with this checkout's kernels."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "src/convexmix", "setup.py"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    old = into / "src" / "convexmix"
    kernels = ROOT / "src" / "convexmix" / "_kernels"
    same = all(
        (old / "_kernels" / c.name).exists()
        and (old / "_kernels" / c.name).read_bytes() == c.read_bytes()
        for c in kernels.glob("*.[ch]")
    )
    if same:  # this checkout's build serves both
        for lib in kernels.glob("*.so"):
            (old / "_kernels" / lib.name).write_bytes(lib.read_bytes())
    else:  # the kernels changed since: build the old ones (a minute)
        print(f"building the native kernels of {ref} ...", flush=True)
        subprocess.run(
            [sys.executable, "setup.py", "build_ext"], cwd=into, check=True, capture_output=True
        )
        built = sorted(into.glob("build/lib*/convexmix/_kernels/*.so"))
        if not built:
            sys.exit(f"building the native kernels of {ref} gave no library")
        for lib in built:
            (old / "_kernels" / lib.name).write_bytes(lib.read_bytes())
    word = re.compile(r"\bconvexmix\b")
    for py in old.rglob("*.py"):
        py.write_text(word.sub("convexmix_before", py.read_text()))
    pkg = into / "pkg"
    pkg.mkdir()
    old.rename(pkg / "convexmix_before")
    sys.path.insert(0, str(pkg))
    return importlib.import_module("convexmix_before")


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def fwd_bwd(f: Callable[[], torch.Tensor], g: torch.Tensor) -> Fn:
    return lambda: f().backward(g)


def cases(m: ModuleType) -> dict[str, Fn]:
    """The cases for the package ``m`` (the same inputs for both versions)."""
    out: dict[str, Fn] = {}
    f = m.functional
    torch.manual_seed(0)
    for k in (2, 3, 8, 32):
        for shape in ((64, 256), (32, 1024)):
            layer = m.WeightedSum(k)
            xs = [torch.randn(*shape, requires_grad=True) for _ in range(k)]
            out[f"WeightedSum({k}) {k} x {shape}"] = fwd_bwd(
                lambda layer=layer, xs=xs: layer(xs), torch.randn(*shape)
            )
    small = [torch.randn(1, 2), torch.randn(1, 2)]
    w2 = torch.tensor([0.3, 0.7])
    out["floor: convex_combination 2 x (1, 2)"] = lambda: f.convex_combination(w2, small)
    layers = [torch.randn(8, 32, 256, requires_grad=True) for _ in range(13)]
    mix = m.ScalarMix(13)
    out["ScalarMix(13) 13 x (8, 32, 256)"] = fwd_bwd(lambda: mix(layers), torch.randn(8, 32, 256))
    for shape in ((1, 8), (256, 8)):
        x = torch.randn(*shape, requires_grad=True)
        z = torch.randn(shape[0], shape[1] - 1, requires_grad=True)
        mask = torch.rand(*shape) > 0.3
        mask[:, 0] = True
        g = torch.randn(*shape)
        out[f"softmax {shape}"] = fwd_bwd(lambda x=x: f.softmax(x, -1), g)
        out[f"softmax mask {shape}"] = fwd_bwd(lambda x=x, mk=mask: f.softmax(x, -1, mask=mk), g)
        out[f"sparsemax {shape}"] = fwd_bwd(lambda x=x: f.sparsemax(x, -1), g)
        out[f"entmax15 {shape}"] = fwd_bwd(lambda x=x: f.entmax15(x, -1), g)
        out[f"entmax a=1.5 {shape}"] = fwd_bwd(lambda x=x: f.entmax(x, 1.5, -1), g)
        out[f"stick_breaking {shape}"] = fwd_bwd(lambda z=z: f.stick_breaking(z, -1), g)
    sw = m.SimplexWeights(10)
    out["SimplexWeights(10)"] = fwd_bwd(lambda: sw(), torch.randn(10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random weight is off the simplex: projected
        lin = m.simplex_(torch.nn.Linear(10, 4, bias=False), "weight")
    out["simplex_(Linear(10, 4)).weight"] = fwd_bwd(lambda: lin.weight, torch.randn(4, 10))
    xp = torch.randn(10000, 10)
    out["project_simplex fwd (10000, 10)"] = lambda: f.project_simplex(xp)
    cc = f.convex_combination
    for k in (2, 8, 32):
        for n in (100_000, 1_000_000, 1 << 22):
            if k * n > 40_000_000:
                continue
            xs = [torch.randn(n) for _ in range(k)]
            xg = [x.clone().requires_grad_() for x in xs]
            w0 = torch.softmax(torch.randn(k), 0)
            w = w0.clone().requires_grad_()
            g = torch.randn(n)
            out[f"convex_combination fwd K={k} N={n}"] = lambda w0=w0, xs=xs: cc(w0, xs)
            out[f"convex_combination fwd+bwd w K={k} N={n}"] = fwd_bwd(
                lambda w=w, xs=xs: cc(w, xs), g
            )
            out[f"convex_combination fwd+bwd w, x K={k} N={n}"] = fwd_bwd(
                lambda w=w, xg=xg: cc(w, xg), g
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", nargs="*", default=[], help="substrings of case names")
    args = parser.parse_args()
    import convexmix as now

    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(args.ref, Path(tmp))
        old, new = cases(before), cases(now)
        load = load_average()
        print(
            f"machine: {platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load}; before = {args.ref}, "
            f"after = this checkout; us per call, best of >= {args.rounds} interleaved rounds\n"
        )
        print("| case | before (us) | after (us) | after / before |")
        print("|---|---:|---:|---:|")
        for name in old:
            if args.only and not any(s in name for s in args.only):
                continue
            tb, ta = pair(old[name], new[name], args.rounds)
            print(f"| {name} | {tb * 1e6:.1f} | {ta * 1e6:.1f} | {ta / tb:.3f} |", flush=True)
        end = load_average()
        print(f"\nload average at the end: {end}")


if __name__ == "__main__":
    main()
