"""``convexmix merge CONFIG.yml --out DIR``: the command's arguments and run (private;
:data:`convexmix.cli.COMMANDS` registers it)."""

from __future__ import annotations

import argparse
import re

from convexmix.errors import ConvexMixError
from convexmix.merge._checkpoints import merge_checkpoints

__all__: list[str] = []

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"5B"`` (mergekit's billions:
    ``K``/``M``/``B`` suffixes) or a plain number of bytes.

    >>> parse_size("5GB"), parse_size("1.5GiB"), parse_size("5B"), parse_size("1024")
    (5000000000, 1610612736, 5000000000, 1024)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(i?)(b?)\s*", str(text).lower())
    if m is None:
        raise ConvexMixError(f"--shard-size must be a size such as 5GB or 500MB; got {text!r}.")
    number, unit, binary, byte = m.groups()
    if unit == "b" and not binary and not byte:  # mergekit's "5B": five billion
        unit = "g"
    scale = 1024 ** " kmgt".index(unit) if binary and unit not in ("", "b") else _UNITS[unit]
    size = int(float(number) * scale)
    if size < 1:
        raise ConvexMixError(f"--shard-size must be at least 1 byte; got {text!r}.")
    return size


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConvexMixError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


HELP = "merge safetensors checkpoints by a mergekit config (linear, task_arithmetic)"
DESCRIPTION = (
    "Merge safetensors checkpoints as a mergekit configuration says (merge_method linear "
    "or task_arithmetic), streamed tensor by tensor with bounded memory, into a new folder "
    "that appears only once it is complete."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``merge`` command's options."""
    p.add_argument("config", metavar="CONFIG.yml", help="the mergekit configuration")
    p.add_argument("--out", required=True, metavar="DIR", help="the output folder")
    p.add_argument(
        "--shard-size",
        type=_size_arg,
        default="5GB",  # parsed by type= (argparse applies it to string defaults)
        metavar="SIZE",
        help="most bytes per output file",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no message")


def run(args: argparse.Namespace) -> int:
    """Run the command; 0 on success (errors are the CLI's ConvexMixError handling)."""
    out = merge_checkpoints(
        args.config,
        args.out,
        shard_size=args.shard_size,
        progress=False if args.quiet else None,
        force=args.force,
    )
    if not args.quiet:
        print(f"merged into {out}")
    return 0
