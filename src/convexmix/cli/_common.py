"""What every command shares (private): the parser with one-line usage errors and
defaults in ``--help``, argument types, the rich console and progress displays, and the
check of output paths."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from convexmix._optional import require
from convexmix.errors import ConvexMixError

__all__: list[str] = []

#: Seeds must fit torch's generator (a signed 64-bit value).
MAX_SEED = 2**63 - 1

Advance = Callable[..., None]
AddBar = Callable[[str, "int | None"], Advance]


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or action.required
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line like every other error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------- argument types


def seed(text: str) -> int:
    """A seed: an int in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int; got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**63); got {text}")
    return value


def count(minimum: int) -> Callable[[str], int]:
    """An int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}; got {text}")
        return value

    parse.__name__ = "int"
    return parse


def number(
    low: float, high: float = math.inf, *, open_low: bool = True, open_high: bool = False
) -> Callable[[str], float]:
    """A finite float in (low, high] (``open_low``, ``open_high`` say which ends are open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (math.isfinite(value) and above and below):
            left = "(" if open_low else "["
            right = ")" if open_high or not math.isfinite(high) else "]"
            raise argparse.ArgumentTypeError(
                f"expected a finite number in {left}{low:g}, {high:g}{right}; got {text}"
            )
        return value

    parse.__name__ = "float"
    return parse


def regularization(text: str) -> float | str:
    """A number >= 0 or "cv"."""
    if text == "cv":
        return "cv"
    try:
        return number(0.0, open_low=False)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'cv'; got {text!r}") from None


# ------------------------------------------------------------------------------ output


def check_outputs(outputs: Sequence[str | Path | None], inputs: Sequence[str | Path]) -> None:
    """Before any work: each output may be written, none is an input, no two are one."""
    from convexmix._files import check_output

    seen: dict[Path, str] = {}
    for out in outputs:
        if out is None:
            continue
        target = check_output(out, inputs)
        if target in seen:
            raise ConvexMixError(f"{seen[target]} and {out} name the same file.")
        seen[target] = str(out)


def rich() -> Any:
    return require("rich", purpose="the convexmix command line")


def console(stderr: bool = False) -> Any:
    rich()
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with code 1; let main() end quietly instead
            self.quiet = True
            raise BrokenPipeError

    stream = sys.stderr if stderr else sys.stdout
    # Pipes and files get 120 columns rather than rich's 80, so tables do not wrap.
    width = None if stream.isatty() else 120
    return _Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


@contextmanager
def progress_group(enabled: bool) -> Iterator[AddBar]:
    """One rich progress display on stderr while the block runs, whose bars are added
    with ``add(description, total)``; each returns its ``advance(**fields)``. Bars with a
    total show the count done, the time elapsed and the time remaining."""
    if not enabled:
        yield lambda description, total: lambda **kw: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[left]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:

        def add(description: str, total: int | None) -> Advance:
            task = bar.add_task(description, total=total, info="", left="")

            def advance(
                info: str = "", completed: int | None = None, total: int | None = None
            ) -> None:
                if total is not None:
                    bar.update(task, total=total)
                if completed is None:
                    bar.advance(task)
                else:
                    bar.update(task, completed=completed)
                bar.update(task, info=info, left="left" if bar.tasks[task].total else "")

            return advance

        yield add


@contextmanager
def progress(enabled: bool, description: str, total: int | None) -> Iterator[Advance]:
    """A rich progress bar on stderr while the block runs; ``advance(**fields)`` moves it."""
    with progress_group(enabled) as add:
        yield add(description, total)
