"""Learned model soups on scikit-learn's digits: LearnedMerge against the usual soups.

    python examples/digits_soup.py [--models 6] [--seeds 3]

An MLP (64 -> 128 -> 10) is trained briefly from one initialisation (the "pre-trained"
model). K copies are then fine-tuned with different learning rates, weight decays and
data orders. The ingredients are merged in five ways, and each is scored on a held-out
test split:

* best single: the fine-tuned model with the best validation accuracy;
* uniform soup: the plain average of the ingredients;
* greedy soup (Wortsman et al., 2022): ingredients in order of validation accuracy, each
  kept if it does not lower the validation accuracy of the running average;
* learned soup, global and per-tensor: ``cx.merge.LearnedMerge`` trained on the
  validation split (cross-entropy, Adam).

Splits: 60% train, 20% validation, 20% test, stratified.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import convexmix as cx


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(x)
    return float((out.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(out, y))


def average(models: list[nn.Module]) -> nn.Module:
    soup = mlp()
    states = [m.state_dict() for m in models]
    soup.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    return soup


def greedy_soup(models: list[nn.Module], xv: torch.Tensor, yv: torch.Tensor) -> nn.Module:
    order = sorted(models, key=lambda m: -score(m, xv, yv)[0])
    chosen = [order[0]]
    for m in order[1:]:
        if score(average([*chosen, m]), xv, yv)[0] >= score(average(chosen), xv, yv)[0]:
            chosen.append(m)
    return average(chosen)


def learned_soup(
    models: list[nn.Module], xv: torch.Tensor, yv: torch.Tensor, granularity: str, epochs: int
) -> nn.Module:
    merge = cx.merge.LearnedMerge(models, granularity=granularity)  # type: ignore[arg-type]
    opt = torch.optim.Adam(merge.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(merge(xv), yv).backward()
        opt.step()
    return merge.merged_model()


def run_seed(seed: int, n_models: int, epochs: int) -> dict[str, tuple[float, float]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_tr, X_rest, y_tr, y_rest = train_test_split(
        X, y, test_size=0.4, stratify=y, random_state=seed
    )
    X_va, X_te, y_va, y_te = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    xt, xv, xe = (torch.tensor(a, dtype=torch.float32) for a in (X_tr, X_va, X_te))
    yt, yv, ye = (torch.tensor(a) for a in (y_tr, y_va, y_te))
    torch.manual_seed(seed)
    base = fit(mlp(), xt, yt, epochs=2, lr=0.05, weight_decay=0.0, seed=seed)
    hyper = [(lr, wd) for lr in (0.003, 0.01, 0.03, 0.1) for wd in (0.0, 1e-3)]
    models = []
    for k in range(n_models):
        lr, wd = hyper[k % len(hyper)]
        model = mlp()
        model.load_state_dict(base.state_dict())
        models.append(
            fit(model, xt, yt, epochs=epochs, lr=lr, weight_decay=wd, seed=1000 * seed + k)
        )
    best = max(models, key=lambda m: score(m, xv, yv)[0])
    soups = {
        "best single": best,
        "uniform soup": average(models),
        "greedy soup": greedy_soup(models, xv, yv),
        "learned soup (global)": learned_soup(models, xv, yv, "global", 200),
        "learned soup (per tensor)": learned_soup(models, xv, yv, "per_tensor", 200),
    }
    return {name: score(m, xe, ye) for name, m in soups.items()}


def main(models: int = 6, seeds: int = 3, epochs: int = 15, verbose: bool = True) -> dict[str, Any]:
    runs = [run_seed(s, models, epochs) for s in range(seeds)]
    table = {
        name: (
            sum(r[name][0] for r in runs) / len(runs),
            sum(r[name][1] for r in runs) / len(runs),
        )
        for name in runs[0]
    }
    if verbose:
        print(f"digits, {models} fine-tuned MLPs, mean over {seeds} seeds (test split)\n")
        print("| method | test accuracy | test log-loss |")
        print("|---|---|---|")
        for name, (acc, loss) in table.items():
            print(f"| {name} | {100 * acc:.2f}% | {loss:.4f} |")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    main(args.models, args.seeds, args.epochs)
