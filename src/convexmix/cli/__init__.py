"""The ``convexmix`` command line (also ``python -m convexmix``).

* ``convexmix ensemble --predictions FILE [FILE ...] --targets FILE``: exact convex blend
  weights for stored predictions, beside equal weights, the best model and Caruana.
* ``convexmix blend --weights W.json --predictions FILE [FILE ...] --out OUT``: apply the
  weights that ``ensemble --out`` wrote to other predictions (the test set's), matched to
  them by the models' names.
* ``convexmix score --weights W.json --predictions FILE [FILE ...] --targets FILE``: the
  blend's scores on those predictions, beside equal weights and each model.
* ``convexmix demo``: the same job on classifiers trained on scikit-learn's bundled data.
* ``convexmix seeds``: the seed scenarios (recover known weights with ``SimplexWeights``).
* ``convexmix info [--json]``: versions, the kernels in use and the CPU output cache (for
  bug reports).

Errors (every :class:`~convexmix.errors.ConvexMixError`, a missing extra included) become
one line on stderr and exit code 2, never a traceback. Result files are written before
anything is printed, so a reader that stops early (``| head``) ends the printing quietly
(exit code 0) with the files complete. Files (``--out``, ``--plot``) are written to a
temporary file and renamed when complete (see :mod:`convexmix._files`). Tables and
progress bars come from ``rich`` (the ``[cli]`` extra).

Commands are entries of :data:`COMMANDS`; a new one is a :class:`Command` (its name,
help, a function that adds its arguments, and one that runs it) appended there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from convexmix import __version__
from convexmix.cli import _blend, _common, _ensemble, _merge, _tools
from convexmix.errors import ConvexMixError

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One subcommand of ``convexmix``.

    Attributes:
        name: the subcommand (``convexmix NAME``).
        help: one line for ``convexmix --help``.
        description: the paragraph of ``convexmix NAME --help``.
        add_arguments: adds the command's options to its parser.
        run: runs it on the parsed arguments and returns the exit code; it raises
            :class:`~convexmix.errors.ConvexMixError` for bad input (``main`` prints it).
        needs_rich: whether it prints with rich (the ``[cli]`` extra).
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    needs_rich: bool = True


COMMANDS: list[Command] = [
    Command(
        "ensemble", _ensemble.HELP, _ensemble.DESCRIPTION, _ensemble.add_arguments, _ensemble.run
    ),
    Command(
        "blend",
        _blend.BLEND_HELP,
        _blend.BLEND_DESCRIPTION,
        _blend.add_blend_arguments,
        _blend.run_blend,
    ),
    Command(
        "score",
        _blend.SCORE_HELP,
        _blend.SCORE_DESCRIPTION,
        _blend.add_score_arguments,
        _blend.run_score,
    ),
    Command(
        "merge", _merge.HELP, _merge.DESCRIPTION, _merge.add_arguments, _merge.run, needs_rich=False
    ),
    Command(
        "demo",
        _tools.DEMO_HELP,
        _tools.DEMO_DESCRIPTION,
        _tools.add_demo_arguments,
        _tools.run_demo,
    ),
    Command(
        "seeds",
        _tools.SEEDS_HELP,
        _tools.SEEDS_DESCRIPTION,
        _tools.add_seeds_arguments,
        _tools.run_seeds,
        needs_rich=False,
    ),
    Command(
        "info",
        _tools.INFO_HELP,
        _tools.INFO_DESCRIPTION,
        _tools.add_info_arguments,
        _tools.run_info,
        needs_rich=False,
    ),
]


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The ``convexmix`` parser, with one subparser per entry of ``commands``
    (:data:`COMMANDS` by default)."""
    parser = _common.Parser(
        prog="convexmix",
        description="Learnable weights that sum to one, for PyTorch: blend stored "
        "predictions, apply and score the blend, and check the installation.",
    )
    parser.add_argument("--version", action="version", version=f"convexmix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_common.Parser)
    for command in COMMANDS if commands is None else commands:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            formatter_class=_common.HelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(command_entry=command)
    return parser


def _quiet_stdout() -> None:
    """Point stdout at devnull, so that Python's flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convexmix`` console script and ``python -m convexmix``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command_entry
    try:
        if command.needs_rich:
            _common.rich()
        return int(command.run(args))
    except ConvexMixError as err:
        print(f"convexmix: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader stopped early (`| head`): the result files are already written, so
        # end quietly, as Unix tools do
        _quiet_stdout()
        return 0
    except OSError as err:
        print(f"convexmix: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convexmix: interrupted", file=sys.stderr)
        return 130
