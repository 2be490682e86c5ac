"""The ``convexmix`` command line: ``convexmix demo``.

Errors become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from convexmix import __version__
from convexmix.errors import ConvexMixError
from convexmix.functional._registry import MAPS

__all__ = ["main"]


def _progress_bar(total: int, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(update, close) for a progress display: tqdm when installed, a plain counter otherwise."""
    if not enabled:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        done = [0]

        def update(n: int) -> None:
            done[0] += n
            if done[0] % max(total // 10, 1) == 0 or done[0] == total:
                print(f"\rtraining {done[0]}/{total} steps", end="", file=sys.stderr, flush=True)

        return update, lambda: print(file=sys.stderr)
    bar = tqdm(total=total, desc="training", unit="step", leave=False)
    return bar.update, bar.close


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in t.tolist()) + "]"


def run_demo(args: argparse.Namespace) -> int:
    from convexmix._demo import SCENARIOS

    if args.steps < 1:
        raise ConvexMixError(f"--steps must be >= 1; got {args.steps}.")
    torch.manual_seed(args.seed)
    update, close = _progress_bar(args.steps * len(SCENARIOS), not args.quiet)
    try:
        results = [scenario(args.map, args.steps, update) for scenario in SCENARIOS]
    finally:
        close()
    print(
        f"convexmix {__version__} demo: the seed scenarios, map={args.map!r}, "
        f"{args.steps} Adam steps each\n"
    )
    for r in results:
        err = (r.learned - r.true).abs().max().item()
        print(f"{r.name}")
        print(f"  learned  {_fmt(r.learned)}")
        print(f"  true     {_fmt(r.true)}")
        print(
            f"  sum {r.learned.sum().item():.6f}   max |error| {err:.4f}   loss {r.loss:.2e}"
            + (f"   {r.extra}" if r.extra else "")
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convexmix", description="Learnable weights that sum to one, for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"convexmix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the seed scenarios and compare with the true weights")
    demo.add_argument("--map", default="softmax", choices=sorted(MAPS), help="the simplex map")
    demo.add_argument("--steps", type=int, default=400, help="Adam steps per scenario")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convexmix`` console script and ``python -m convexmix``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args))
    except ConvexMixError as err:
        print(f"convexmix: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convexmix: interrupted", file=sys.stderr)
        return 130
