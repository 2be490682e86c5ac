"""Overhead of convexmix.data: sampler throughput and the cost of a weights step.

    python benchmarks/bench_data.py [--rounds 5] [--draws 2000000]

One run prints, on one thread (``torch.set_num_threads(1)``):

* ``MixtureSampler`` throughput in indices per second over K = 8 domains: fixed weights,
  live ``MixtureWeights`` that do not change, and ``replacement=False``; beside it the
  throughput of the obvious alternative, ``torch.utils.data.WeightedRandomSampler`` over
  per-example weights (which cannot change its weights mid-epoch), and the ratio;
* a live sampler whose weights change every 64 indices (one change per batch, the
  training loop's pattern), in indices per second;
* ``MixtureWeights.step`` (DoReMi, K = 4, a mapping of losses and references, as the
  example passes them) against one training step of ``examples/data_mixing.py`` (the
  MLP's Adam step on a batch of 64 plus the reference model's forward), and the ratio.

Each pair is timed interleaved (one of each, again), best of ``--rounds`` rounds, so both
see the same load; the machine's load average is printed with the figures.
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
SIZES = [200_000, 50_000, 10_000, 1_000, 300_000, 80_000, 5_000, 20_000]


def best_pair(a: Callable[[], float], b: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Best (a, b) seconds over interleaved rounds."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(a())
        tb.append(b())
    return min(ta), min(tb)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
        t = time.perf_counter()
        for i, _ in enumerate(s):
            if i % 64 == 63:
                changing._version += 1  # a change every batch, without the step's cost
        return time.perf_counter() - t

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
        t = time.perf_counter()
        for idx in batches:
            _, _, i = run.step(idx)
            with torch.no_grad():
                reference(run.x[i])
        return (time.perf_counter() - t) / len(batches)

    def weight_steps() -> float:
        t = time.perf_counter()
        for _ in range(20):
            for means, counts, ref in stats:
                mw.step(means, ref, counts=counts)
        return (time.perf_counter() - t) / (20 * len(stats))

    tw, tt = best_pair(weight_steps, train_steps, rounds)
    print("MixtureWeights.step (doremi, K = 4) vs one step of examples/data_mixing.py")
    print(
        f"  step {tw * 1e6:7.1f} us   training step {tt * 1e3:6.2f} ms   "
        f"ratio {100 * tw / tt:5.2f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=2_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"load {os.getloadavg()}"
    )
    sampler_rows(args.draws, args.rounds)
    step_rows(args.rounds)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
