"""Does the overfitting guard help on small validation sets? Evidence for the docs.

    python benchmarks/ensemble_guard.py [--draws 30] [--dataset digits]

The demo's 8 scikit-learn classifiers give out-of-fold predictions on the training split
(1078 digits) and predictions on the test split (719). For validation sets of n samples
drawn from the out-of-fold set (``--draws`` draws per n), it fits the blend weights with
no guard (``regularization=0``), with the cross-validated guard (``"cv"``), and compares
them with equal weights and the best single model (picked on the same n samples). It
prints the mean test log-loss (+- its standard error), in how many draws the guard is
better, worse or the same (it chose lambda = 0), and the worst draw of each.
"""

from __future__ import annotations

import argparse
import math

import torch

from convexmix import _demo
from convexmix.ensemble import fit_weights


def log_loss(P: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    blend = torch.tensordot(w, P, 1)
    return float(-blend.gather(1, y[:, None]).clamp_min(1e-15).log().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--dataset", default="digits", choices=_demo.DATASETS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    args = parser.parse_args()
    data = _demo.predictions(args.dataset, 0, lambda msg: None)
    K, n_all = data.val.shape[0], data.val.shape[1]
    eye = torch.eye(K, dtype=torch.float64)
    equal = log_loss(data.test, data.y_test, torch.full((K,), 1 / K, dtype=torch.float64))
    full = log_loss(data.test, data.y_test, fit_weights(data.val, data.y_val).weights)
    print(
        f"{args.dataset}: {K} models; test log-loss of equal weights {equal:.4f}, "
        f"of the fit on all {n_all} validation samples {full:.4f}\n"
    )
    print(
        f"{'n':>5s} {'no guard':>16s} {'cv guard':>16s} {'best single':>16s} "
        f"{'guard better/worse/same':>24s} {'worst no guard':>15s} {'worst cv':>9s}"
    )
    gen = torch.Generator().manual_seed(0)
    for n in args.sizes:
        plain, guarded, single = [], [], []
        for _ in range(args.draws):
            idx = torch.randperm(n_all, generator=gen)[:n]
            P, y = data.val[:, idx], data.y_val[idx]
            a = fit_weights(P, y)
            b = fit_weights(P, y, regularization="cv")
            best = int(torch.tensor([log_loss(P, y, eye[k]) for k in range(K)]).argmin())
            plain.append(log_loss(data.test, data.y_test, a.weights))
            guarded.append(log_loss(data.test, data.y_test, b.weights))
            single.append(log_loss(data.test, data.y_test, eye[best]))

        def fmt(v: list[float]) -> str:
            t = torch.tensor(v)
            return f"{t.mean():.4f} +- {t.std() / math.sqrt(len(v)):.4f}"

        pairs = list(zip(guarded, plain, strict=True))
        better = sum(g < p - 1e-12 for g, p in pairs)
        worse = sum(g > p + 1e-12 for g, p in pairs)
        same = len(pairs) - better - worse
        print(
            f"{n:5d} {fmt(plain):>16s} {fmt(guarded):>16s} {fmt(single):>16s} "
            f"{f'{better} / {worse} / {same}':>24s} {max(plain):15.4f} {max(guarded):9.4f}"
        )


if __name__ == "__main__":
    main()
