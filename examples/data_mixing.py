"""Learning a training-data mixture online: DoReMi and exponentiated gradient against the
uniform and the proportional (stratified) mixtures, on synthetic domains.

    python examples/data_mixing.py [--seeds 5] [--steps 1500] [--quick] [--plot PATH]

Four regression domains share the inputs x ~ N(0, I_16) and differ in difficulty, size
and noise (the model gets x and the domain's one-hot):

* ``easy``: a linear function, 20,000 examples, noise sd 0.1;
* ``medium``: a small tanh network, 6,000 examples, noise sd 0.1;
* ``hard``: a sine plus a square of projections, 8,000 examples, noise sd 0.1;
* ``noisy``: a linear function, 6,000 examples, noise sd 1.0 (a high loss that no model
  can lower: the trap for a method that chases the raw loss).

Every mixture trains the same MLP for the same number of steps (batch 64, Adam), drawing
its batches with :class:`convexmix.data.MixtureSampler`. The mixtures:

* ``uniform``: 1/4 each; ``proportional``: by domain size (stratified sampling);
* ``doremi``: DoReMi's recipe: a reference model trained on the uniform mixture, then a
  proxy model trained while :class:`convexmix.data.MixtureWeights` (``"doremi"``) moves
  the weights toward the domains with a high excess loss over the reference (the sampler
  follows the weights as they change); a fresh model is then trained on the proxy's
  average weights. Three runs' worth of compute, the price DoReMi pays;
* ``eg online``: one run whose sampler follows exponentiated-gradient weights on the raw
  per-domain losses (``"eg"``, group DRO's update) while the model trains.

Scored on 2,000 held-out examples per domain: the average and the worst per-domain MSE,
and the worst excess MSE (the MSE minus the domain's noise variance, what the model can
still learn). The weights of the DoReMi proxy and of EG over the steps are plotted.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler

from convexmix.data import MixtureSampler, MixtureWeights

NAMES = ["easy", "medium", "hard", "noisy"]
SIZES = [20_000, 6_000, 8_000, 6_000]
NOISE = [0.1, 0.1, 0.1, 1.0]
DIM = 16
HELD_OUT = 2_000
BATCH = 64


def make_domains(seed: int) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """(train, held-out) pairs (x with the one-hot appended, y) per domain."""
    g = torch.Generator().manual_seed(seed)
    w_easy = torch.randn(DIM, generator=g) / math.sqrt(DIM)
    a_med = torch.randn(DIM, 8, generator=g) / math.sqrt(DIM) * 2
    v_med = torch.randn(8, generator=g)
    a_hard = torch.randn(DIM, 2, generator=g) / math.sqrt(DIM) * 1.5
    w_noisy = torch.randn(DIM, generator=g) / math.sqrt(DIM)

    def target(d: int, x: Tensor) -> Tensor:
        if d == 0:
            return x @ w_easy
        if d == 1:
            return torch.tanh(x @ a_med) @ v_med / 2
        if d == 2:
            z = x @ a_hard
            return torch.sin(2 * z[:, 0]) + z[:, 1].square() - 2.25
        return x @ w_noisy

    train, held = [], []
    for d, n in enumerate(SIZES):
        x = torch.randn(n + HELD_OUT, DIM, generator=g)
        y = target(d, x) + NOISE[d] * torch.randn(n + HELD_OUT, generator=g)
        x = torch.cat([x, nn.functional.one_hot(torch.full((n + HELD_OUT,), d), 4).float()], 1)
        train.append((x[:n], y[:n]))
        held.append((x[n:], y[n:]))
    return train, held


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(DIM + 4, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)
    )


class Run:
    """One training run: a model, its optimizer and the concatenated training data."""

    def __init__(self, train: list[tuple[Tensor, Tensor]], seed: int) -> None:
        self.x = torch.cat([x for x, _ in train])
        self.y = torch.cat([y for _, y in train])
        self.dom = torch.cat([torch.full((len(y),), d) for d, (_, y) in enumerate(train)])
        self.model = mlp(seed)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-3)

    def step(self, idx: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """One Adam step on the batch; returns (per-example loss, domains, batch index)."""
        i = torch.tensor(idx)
        self.opt.zero_grad()
        loss = (self.model(self.x[i]).squeeze(1) - self.y[i]).square()
        loss.mean().backward()
        self.opt.step()
        return loss.detach(), self.dom[i], i


def per_domain(loss: Tensor, dom: Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """Mean loss and count of each domain present in the batch."""
    sums = torch.zeros(4).index_add_(0, dom, loss).tolist()
    counts = torch.bincount(dom, minlength=4).tolist()
    means = {NAMES[d]: sums[d] / counts[d] for d in range(4) if counts[d]}
    return means, {NAMES[d]: counts[d] for d in range(4) if counts[d]}


def train(
    data: list[tuple[Tensor, Tensor]],
    weights: MixtureWeights | list[float],
    *,
    steps: int,
    seed: int,
    reference: nn.Module | None = None,
    history: list[list[float]] | None = None,
    averages: list[list[float]] | None = None,
) -> nn.Module:
    """Train for ``steps`` batches drawn by a MixtureSampler over ``weights``; a
    MixtureWeights is stepped after each batch (with the reference's losses, if given)."""
    run = Run(data, seed)
    sampler = MixtureSampler(SIZES, weights, num_samples=steps * BATCH, seed=seed)
    live = weights if isinstance(weights, MixtureWeights) else None
    for idx in BatchSampler(sampler, BATCH, drop_last=False):
        loss, dom, i = run.step(idx)
        if live is None:
            continue
        means, counts = per_domain(loss, dom)
        ref = None
        if reference is not None:
            with torch.no_grad():
                ref_loss = (reference(run.x[i]).squeeze(1) - run.y[i]).square()
            ref = per_domain(ref_loss, dom)[0]
        live.step(means, ref, counts=counts)
        if history is not None:
            history.append(live.weights.tolist())
        if averages is not None:
            averages.append(live.average.tolist())
    return run.model


@torch.no_grad()
def evaluate(model: nn.Module, held: list[tuple[Tensor, Tensor]]) -> list[float]:
    return [float((model(x).squeeze(1) - y).square().mean()) for x, y in held]


def main(
    seeds: int = 5, steps: int = 1500, plot: str | None = None, verbose: bool = True
) -> dict[str, Any]:
    """Train every mixture on ``seeds`` seeds; print the table, save the plot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: threads only contend
    try:
        return _main(seeds, steps, plot, verbose)
    finally:
        torch.set_num_threads(threads)


def _main(seeds: int, steps: int, plot: str | None, verbose: bool) -> dict[str, Any]:
    methods = ["uniform", "proportional", "doremi", "eg online"]
    losses: dict[str, list[list[float]]] = {m: [] for m in methods}
    weights_used: dict[str, list[list[float]]] = {m: [] for m in methods}
    histories: dict[str, list[list[float]]] = {}
    uniform = [0.25] * 4
    proportional = [n / sum(SIZES) for n in SIZES]
    t0 = time.perf_counter()
    for seed in range(seeds):
        data, held = make_domains(seed)
        losses["uniform"].append(evaluate(train(data, uniform, steps=steps, seed=seed), held))
        losses["proportional"].append(
            evaluate(train(data, proportional, steps=steps, seed=seed), held)
        )
        # DoReMi: reference (uniform), proxy (online weights), final model on the average
        reference = train(data, uniform, steps=steps, seed=seed + 100)
        doremi = MixtureWeights(NAMES, update="doremi", lr=1.0, smoothing=1e-3)
        hist_d: list[list[float]] = []
        avg_d: list[list[float]] = []
        train(
            data,
            doremi,
            steps=steps,
            seed=seed + 200,
            reference=reference,
            history=hist_d,
            averages=avg_d,
        )
        avg = doremi.average.tolist()
        losses["doremi"].append(evaluate(train(data, avg, steps=steps, seed=seed), held))
        eg = MixtureWeights(NAMES, update="eg", lr=0.05, smoothing=0.05)
        hist_e: list[list[float]] = []
        losses["eg online"].append(
            evaluate(train(data, eg, steps=steps, seed=seed, history=hist_e), held)
        )
        weights_used["uniform"].append(uniform)
        weights_used["proportional"].append(proportional)
        weights_used["doremi"].append(avg)
        weights_used["eg online"].append(eg.average.tolist())
        if seed == 0:
            histories = {"doremi proxy": hist_d, "doremi average": avg_d, "eg online": hist_e}
    rows = {}
    for m in methods:
        per = torch.tensor(losses[m])  # (seeds, 4)
        excess = per - torch.tensor(NOISE).square()
        rows[m] = {
            "per_domain": per.mean(0).tolist(),
            "average": float(per.mean(1).mean()),
            "worst": float(per.max(1).values.mean()),
            "worst_excess": float(excess.max(1).values.mean()),
            "worst_excess_sd": float(excess.max(1).values.std()) if seeds > 1 else 0.0,
            "worst_excess_per_seed": excess.max(1).values.tolist(),
            "weights": torch.tensor(weights_used[m], dtype=torch.float64).mean(0).tolist(),
        }
    seconds = time.perf_counter() - t0
    if verbose:
        print(f"{seeds} seeds x {steps} steps of batch {BATCH}; {seconds:.0f} s")
        head = " ".join(f"{n:>7}" for n in NAMES)
        print(
            f"{'mixture':<13} {'weights (' + ', '.join(NAMES) + ')':<32} {head}"
            "   avg  worst  worst excess"
        )
        for m, r in rows.items():
            w = ", ".join(f"{v:.2f}" for v in r["weights"])
            per_s = " ".join(f"{v:7.3f}" for v in r["per_domain"])
            print(
                f"{m:<13} {w:<32} {per_s} {r['average']:6.3f} {r['worst']:6.3f} "
                f"{r['worst_excess']:6.3f} +- {r['worst_excess_sd']:.3f}"
            )
        print("worst excess MSE per seed:")
        for m, r in rows.items():
            print(f"  {m:<13} " + " ".join(f"{v:.3f}" for v in r["worst_excess_per_seed"]))
    if plot:
        plot_histories(histories, plot)
    return {"rows": rows, "histories": histories, "seconds": seconds}


def plot_histories(histories: dict[str, list[list[float]]], path: str) -> None:
    from convexmix._optional import require

    plt = require("matplotlib.pyplot", purpose="the weights plot")
    panels = {k: v for k, v in histories.items() if k != "doremi average"}
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.4), sharey=True)
    for ax, (name, hist) in zip(axes, panels.items(), strict=True):
        h = torch.tensor(hist)
        for d in range(h.shape[1]):
            line = ax.plot(h[:, d], label=NAMES[d], lw=0.8)[0]
            if name == "doremi proxy":
                avg = torch.tensor(histories["doremi average"])[:, d]
                ax.plot(avg, color=line.get_color(), ls="--", lw=1.8)
        ax.set_title(
            f"{name} weights" + (" (dashed: the average)" if name == "doremi proxy" else "")
        )
        ax.set_xlabel("step")
    axes[0].set_ylabel("weight")
    axes[0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps (a smoke test)")
    parser.add_argument("--plot", default=None, help="save the weights plot here (PNG)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps = 1, 60
    main(seeds=args.seeds, steps=args.steps, plot=args.plot)


if __name__ == "__main__":
    _cli()
