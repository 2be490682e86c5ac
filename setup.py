"""Builds convexmix's native CPU kernels at install time (``pip install .``, ``pip wheel .``,
``pip install -e .`` and ``python -m build`` all come here; the metadata is in
pyproject.toml).

``src/convexmix/_kernels/*.c`` (combine, pool, capped, gather, checks, rows) are plain C:
no Python or torch headers, so the shared libraries are loaded with ctypes and one wheel
per platform works with every Python 3 and every torch. They are built once per
instruction set, never with ``-march=native``:

* x86-64: ``x86-64`` (the baseline: SSE2), ``avx2`` (AVX2 + FMA + F16C) and ``avx512``
  (AVX-512 F/BW/VL/DQ on top of those);
* aarch64 (and anything else): one baseline build.

At import, ``convexmix._kernels.native`` asks the baseline library which of them the CPU
(and the OS) supports and loads the widest one. Where no C compiler works, the package
installs without the libraries and convexmix runs its ATen loop, saying so once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 (the build requires >= 77; for old direct calls)
    bdist_wheel = None

HERE = Path(__file__).resolve().parent
KERNELS = Path("src", "convexmix", "_kernels")
SOURCES = [
    str(KERNELS / "combine.c"),
    str(KERNELS / "pool.c"),
    str(KERNELS / "capped.c"),
    str(KERNELS / "gather.c"),
    str(KERNELS / "checks.c"),
    str(KERNELS / "rows.c"),
]
PACKAGE = "convexmix._kernels"
#: Flags of every build: plain C11, no Python, nothing tuned to the build machine.
#: -fno-math-errno lets sqrt vectorise (errno is never read; no value changes);
#: -fno-trapping-math lets the compiler compute both sides of a select (the floating-point
#: exception flags are never read; no value changes): the capped projection's lockstep
#: update only vectorises with it. clang's default already.
BASE_FLAGS = [
    "-std=gnu11",
    "-O3",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
    "-pthread",
    "-g0",
]
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
#: Instruction sets built on this platform, baseline first (native.py reads the same names).
ISAS: list[tuple[str, list[str]]] = (
    [
        ("x86-64", []),
        ("avx2", ["-mavx2", "-mfma", "-mf16c"]),
        (
            "avx512",
            ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
        ),
    ]
    if _X86
    else [("aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "generic", [])]
)


def source_hash() -> str:
    """The hash the libraries carry, so a build older than its sources is never loaded."""
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update((HERE / path).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class BuildKernels(build_ext):
    """Compiles each ISA's shared library; a failing compiler is a warning, not an error."""

    def get_ext_filename(self, fullname: str) -> str:
        # libconvexmix-<isa>.so: a plain shared library (no Python ABI tag), and a name
        # that is no Python identifier, so nothing ever tries to import it.
        return os.path.join(*fullname.split(".")) + ".so"

    def run(self) -> None:
        if sys.platform == "win32":
            self._skip("the native kernels are built for Linux and macOS only")
            return
        try:
            super().run()
        except Exception as err:  # no compiler at all: a pure-Python install
            self._skip(f"no working C compiler ({err})")

    def build_extensions(self) -> None:
        baseline = self.extensions[0]
        try:
            self.build_extension(baseline)
        except Exception as err:
            self._skip(f"the baseline build failed ({err})")
            self._remove_outputs()
            return
        for ext in self.extensions[1:]:
            try:
                self.build_extension(ext)
            except Exception as err:  # an old compiler without AVX-512: keep the rest
                print(f"convexmix: skipped the {ext.name} build ({err})", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        isa = ext.name.split("libconvexmix-", 1)[-1]
        target = self.get_ext_fullpath(ext.name)
        temp = os.path.join(self.build_temp, isa)
        objects = self.compiler.compile(
            ext.sources,
            output_dir=temp,
            macros=list(ext.define_macros),
            extra_postargs=ext.extra_compile_args,
        )
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        self.compiler.link_shared_object(
            objects, target, extra_postargs=ext.extra_link_args, target_lang="c"
        )

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            if os.path.exists(path):
                os.remove(path)

    @staticmethod
    def _skip(reason: str) -> None:
        print(
            f"convexmix: WARNING: native CPU kernels not built: {reason}. convexmix will run "
            "its slower ATen loop; install a C compiler (gcc or clang) and reinstall for the "
            "native kernels.",
            file=sys.stderr,
        )


def extensions() -> list[Extension]:
    digest = source_hash()
    return [
        Extension(
            f"{PACKAGE}.libconvexmix-{isa}",
            sources=SOURCES,
            define_macros=[("CX_SOURCE_HASH", f'"{digest}"'), ("CX_ISA", f'"{isa}"')],
            extra_compile_args=BASE_FLAGS + flags,
            extra_link_args=["-pthread"],
        )
        for isa, flags in ISAS
    ]


cmdclass: dict[str, type] = {"build_ext": BuildKernels}

if bdist_wheel is not None:

    class Wheel(bdist_wheel):  # type: ignore[misc, valid-type]
        """One wheel per platform for every Python 3: the libraries use no Python C-API."""

        def get_tag(self) -> tuple[str, str, str]:
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = Wheel

setup(ext_modules=extensions(), cmdclass=cmdclass)
