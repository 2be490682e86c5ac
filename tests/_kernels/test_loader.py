"""The ground loader (``_kernels/native.py``): one range splitter for every family, and
a library that ``torch.compile`` can reach on a process's first native call."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from convexmix._kernels import native

needs_native = pytest.mark.skipif(native.library() is None, reason="installed without kernels")


@pytest.mark.parametrize("n", [0, 1, 5, 63, 64, 65, 1000, 100_003])
@pytest.mark.parametrize("parts", [1, 2, 3, 7, 200])
@pytest.mark.parametrize("align", [1, 64])
def test_split_covers_the_range_in_order(n: int, parts: int, align: int) -> None:
    ranges = native.split(n, parts, align)
    if n == 0:
        assert ranges == [(0, 0)]
        return
    assert ranges[0][0] == 0
    assert ranges[-1][1] == n
    assert all(a < b for a, b in ranges)
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert all(a % align == 0 for a, _ in ranges)
    assert len(ranges) <= min(parts, n)
    # equal steps: every range but the last has the same length
    assert len({b - a for a, b in ranges[:-1]}) <= 1


def test_library_is_resolved_at_import_and_read_without_a_lock() -> None:
    code = (
        "import sys\n"
        "from convexmix._kernels import native\n"
        "assert 'lib' in native._state, 'not resolved at import'\n"
        "class Boom:\n"
        "    def __enter__(self): raise AssertionError('library() took the lock')\n"
        "    def __exit__(self, *a): pass\n"
        "native._lock = Boom()\n"
        "native.library(); native.isa()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_native
@pytest.mark.parametrize(
    "call",
    [
        "cx.functional.project_simplex(x)",
        "cx.functional.project_l1_ball(x)",
        "cx.functional.sparsemax(x)",
        "cx.functional.convex_combination(torch.ones(3) / 3, [x, x, x])",
    ],
)
def test_compiled_fullgraph_as_the_first_native_call(call: str) -> None:
    """The first native call of a process inside ``torch.compile(fullgraph=True)``: the
    loader's lock made Dynamo raise Unsupported until one eager call had loaded it."""
    code = (
        "import torch, convexmix as cx\n"
        "x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))\n"
        f"f = torch.compile(lambda x: {call}, fullgraph=True, backend='eager')\n"
        "got = f(x)\n"
        f"torch.testing.assert_close(got, {call})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_names_other_modules_import() -> None:
    """The ground keeps the loader's names; each family lives in its own module."""
    from convexmix._kernels import capped, checks, cpu, gather, rows

    assert callable(native.library)
    assert callable(native.isa)
    assert native.ISAS
    assert native.SOURCES
    assert torch.float32 in native.SUFFIX
    for fn in (
        cpu.forward,
        cpu.backward,
        rows.rows_forward,
        rows.rows_backward,
        capped.capped,
        checks.first_nan,
        gather.true_class,
    ):
        assert callable(fn)
