"""Overhead of convexmix.data: sampler throughput and the cost of a weights step.

    python benchmarks/bench_data.py [--rounds 5] [--draws 2000000] [--only-steps]
                                    [--clock wall|thread] [--against SRC]

One run prints, on one thread (``torch.set_num_threads(1)``):

* ``MixtureSampler`` throughput in indices per second over K = 8 domains: fixed weights,
  live ``MixtureWeights`` that do not change, and ``replacement=False``; beside it the
  throughput of the obvious alternative, ``torch.utils.data.WeightedRandomSampler`` over
  per-example weights (which cannot change its weights mid-epoch), and the ratio;
* a live sampler whose weights change every 64 indices (one change per batch, the
  training loop's pattern), in indices per second;
* ``MixtureWeights.step`` (DoReMi, K = 4, a mapping of losses and references, as the
  example passes them) against one training step of ``examples/data_mixing.py`` (the
  MLP's Adam step on a batch of 64 plus the reference model's forward), and the ratio;
* ``MixtureWeights.step`` alone (DoReMi, best of ``--rounds``) for K = 4, 16 and 64
  domains, given mappings (losses, references and int counts) or (K,) float64 tensors;
* with ``--against SRC``, the same steps against another version's (its source folder),
  both loaded in this process and timed in alternation, and the speed-up.

Each pair is timed interleaved (one of each, again), best of ``--rounds`` rounds, so both
see the same load; the machine's load average is printed with the figures. On a shared
machine, ``--clock thread`` times with the thread's CPU time instead of wall time
(everything runs on one thread), which the other jobs inflate far less.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import WeightedRandomSampler

from convexmix.data import MixtureSampler, MixtureWeights

ROOT = Path(__file__).resolve().parents[1]
# what the rows time with: wall time, or (``--clock thread``) this thread's CPU time, which
# a loaded machine inflates far less (everything timed runs on this one thread)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}
clock = CLOCKS["wall"]
SIZES = [200_000, 50_000, 10_000, 1_000, 300_000, 80_000, 5_000, 20_000]


def best_pair(a: Callable[[], float], b: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Best (a, b) seconds over interleaved rounds."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(a())
        tb.append(b())
    return min(ta), min(tb)


def timed(fn: Callable[[], object]) -> float:
    t = clock()
    fn()
    return clock() - t


def drain(sampler: object) -> None:
    for _ in sampler:  # type: ignore[attr-defined]
        pass


def sampler_rows(draws: int, rounds: int) -> None:
    k = len(SIZES)
    probs = torch.tensor([0.3, 0.1, 0.05, 0.05, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)
    per_example = torch.cat(
        [torch.full((n,), float(p) / n) for n, p in zip(SIZES, probs, strict=True)]
    )
    baseline = WeightedRandomSampler(per_example, draws, replacement=True)
    live = MixtureWeights(k, lr=1.0, init=probs.tolist())
    cases = {
        "fixed weights": MixtureSampler(SIZES, probs, num_samples=draws, seed=0),
        "live MixtureWeights": MixtureSampler(SIZES, live, num_samples=draws, seed=0),
        "replacement=False": MixtureSampler(
            SIZES, probs, num_samples=draws, seed=0, replacement=False
        ),
    }
    print(
        f"sampler, {draws:,} indices, K = {k}, one thread "
        "(indices/s; ratio to WeightedRandomSampler)"
    )
    for name, s in cases.items():
        ta, tb = best_pair(
            lambda s=s: timed(lambda: drain(s)), lambda: timed(lambda: drain(baseline)), rounds
        )
        print(
            f"  {name:<22} {draws / ta / 1e6:6.2f} M/s   "
            f"WeightedRandomSampler {draws / tb / 1e6:6.2f} M/s   ratio {tb / ta:5.2f}x"
        )

    changing = MixtureWeights(k, lr=1e-3)
    s = MixtureSampler(SIZES, changing, num_samples=draws // 4, seed=0)
    loss = [0.1 * i for i in range(k)]

    def run_changing() -> float:
        t = clock()
        for i, _ in enumerate(s):
            if i % 64 == 63:
                changing._version += 1  # a change every batch, without the step's cost
        return clock() - t

    t = min(run_changing() for _ in range(rounds))
    print(
        f"  weights change every 64 indices: {draws // 4 / t / 1e6:6.2f} M/s "
        "(256 draws mapped anew after each change)"
    )
    _ = loss


def step_rows(rounds: int) -> None:
    spec = importlib.util.spec_from_file_location(
        "data_mixing", ROOT / "examples" / "data_mixing.py"
    )
    assert spec is not None
    assert spec.loader is not None
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    data, _ = ex.make_domains(0)
    run = ex.Run(data, 0)
    reference = ex.mlp(1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(run.y), (ex.BATCH,), generator=g).tolist() for _ in range(50)]
    mw = MixtureWeights(ex.NAMES, update="doremi", lr=1.0, smoothing=1e-3)
    stats = []
    for idx in batches:
        loss, dom, i = run.step(idx)
        with torch.no_grad():
            ref = (reference(run.x[i]).squeeze(1) - run.y[i]).square()
        stats.append((*ex.per_domain(loss, dom), ex.per_domain(ref, dom)[0]))

    def train_steps() -> float:
        t = clock()
        for idx in batches:
            _, _, i = run.step(idx)
            with torch.no_grad():
                reference(run.x[i])
        return (clock() - t) / len(batches)

    def weight_steps() -> float:
        t = clock()
        for _ in range(20):
            for means, counts, ref in stats:
                mw.step(means, ref, counts=counts)
        return (clock() - t) / (20 * len(stats))

    tw, tt = best_pair(weight_steps, train_steps, rounds)
    print("MixtureWeights.step (doremi, K = 4) vs one step of examples/data_mixing.py")
    print(
        f"  step {tw * 1e6:7.1f} us   training step {tt * 1e3:6.2f} ms   "
        f"ratio {100 * tw / tt:5.2f} %"
    )


Steps = list[tuple[object, object, object]]


def step_inputs(k: int) -> dict[str, Steps]:
    """50 steps of DoReMi inputs over K domains: mappings (losses, references and int
    counts, as the example passes them) and (K,) float64 tensors."""
    names = [f"d{i}" for i in range(k)]
    g = torch.Generator().manual_seed(k)

    def by_name(values: torch.Tensor) -> dict[str, object]:
        return dict(zip(names, values.tolist(), strict=True))

    return {
        "mappings": [
            (
                by_name(torch.rand(k, generator=g) * 3),
                by_name(torch.rand(k, generator=g)),
                by_name(torch.randint(1, 30, (k,), generator=g)),
            )
            for _ in range(50)
        ],
        "tensors": [
            (
                torch.rand(k, generator=g, dtype=torch.float64) * 3,
                torch.rand(k, generator=g, dtype=torch.float64),
                None,
            )
            for _ in range(50)
        ],
    }


def stepper(cls: type, k: int, steps: Steps) -> Callable[[], float]:
    """Seconds a step of a fresh ``cls`` (a MixtureWeights) takes over ``steps``."""
    mw = cls([f"d{i}" for i in range(k)], update="doremi", lr=1.0, smoothing=1e-3)
    reps = max(1, 400 // k)

    def run() -> float:
        t = clock()
        for _ in range(reps):
            for loss, ref, counts in steps:
                mw.step(loss, ref, counts=counts)
        return (clock() - t) / (reps * len(steps))

    return run


def step_sizes(rounds: int) -> None:
    print("MixtureWeights.step alone (doremi, best of rounds): mappings | (K,) tensors")
    for k in (4, 16, 64):
        times = {
            form: min(stepper(MixtureWeights, k, steps)() for _ in range(rounds))
            for form, steps in step_inputs(k).items()
        }
        print(
            f"  K = {k:2d}   {times['mappings'] * 1e6:6.1f} us | {times['tensors'] * 1e6:6.1f} us"
        )


def against_rows(src: Path, rounds: int) -> None:
    """This MixtureWeights.step against another version's, both in this process, in
    alternation. ``src`` is that version's source folder (the one holding ``convexmix``,
    e.g. ``git archive COMMIT src | tar -x -C /tmp/old`` gives ``/tmp/old/src``); its
    ``convexmix/data/_weights.py`` is loaded beside this one (it imports the rest of
    convexmix from this version, so the two must agree on those helpers)."""
    path = src / "convexmix" / "data" / "_weights.py"
    spec = importlib.util.spec_from_file_location("convexmix.data._weights_against", path)
    assert spec is not None
    assert spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    print(f"MixtureWeights.step against {path} (doremi, alternating, best of rounds)")
    for k in (4, 16, 64):
        for form, steps in step_inputs(k).items():
            now, then = stepper(MixtureWeights, k, steps), stepper(other.MixtureWeights, k, steps)
            t_now, t_then = best_pair(now, then, rounds)
            print(
                f"  K = {k:2d} {form:<8}  this {t_now * 1e6:6.1f} us   other "
                f"{t_then * 1e6:6.1f} us   this is {t_then / t_now:4.2f}x faster"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=2_000_000)
    parser.add_argument("--only-steps", action="store_true", help="skip the sampler rows")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument(
        "--against",
        type=Path,
        metavar="SRC",
        help="also time the step of the convexmix in SRC (another version) in alternation",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"load {os.getloadavg()}, {args.clock} clock"
    )
    if not args.only_steps:
        sampler_rows(args.draws, args.rounds)
    step_rows(args.rounds)
    step_sizes(args.rounds)
    if args.against is not None:
        against_rows(args.against, args.rounds)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
