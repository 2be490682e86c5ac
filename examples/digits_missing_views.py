"""Multi-view fusion with missing views on scikit-learn's bundled digits.

Each 8x8 digit is cut into four 4x4 quadrant views. Each view has a small MLP encoder,
and the four embeddings are fused by ``cx.WeightedSum`` before a linear classifier.
During training every view goes missing for a sample with probability ``p_drop``
(at least one stays). Three fusions are compared on the same encoders and head:

* ``WeightedSum + mask``: learned weights, renormalised over each sample's present views;
* ``masked mean``: the usual hand-written fallback, the mean of the present embeddings;
* ``WeightedSum, no mask``: the same layer without a mask; missing views are zero-filled
  at the input, as a model without mask support must do.

Test accuracy is reported with all views, with one and two views missing (averaged over
the choices of missing views), and with a single view left; mean +- std over seeds.

    python examples/digits_missing_views.py [--epochs 60] [--seeds 3] [--out docs/figures]

Needs the ``[examples]`` extra (scikit-learn, matplotlib for the plot).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch
from torch import Tensor, nn

import convexmix as cx

VIEWS = ["top-left", "top-right", "bottom-left", "bottom-right"]
FUSIONS = ["WeightedSum + mask", "masked mean", "WeightedSum, no mask"]


def load_views(seed: int, noise: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/test quadrant views ``(N, 4, 16)`` in [0, 1] and labels, split 75/25.

    ``noise > 0`` adds Gaussian noise of that std to the bottom-right view: a degraded sensor.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8)
    views = torch.stack(
        [images[:, r : r + 4, c : c + 4].reshape(-1, 16) for r in (0, 4) for c in (0, 4)], dim=1
    )
    if noise > 0:
        gen = torch.Generator().manual_seed(1000 + seed)
        views[:, 3] += noise * torch.randn(views[:, 3].shape, generator=gen)
    labels = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        range(len(labels)), test_size=0.25, random_state=seed, stratify=labels.numpy()
    )
    return views[idx_train], labels[idx_train], views[idx_test], labels[idx_test]


class MultiViewNet(nn.Module):
    def __init__(self, fusion: str, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        self.fusion = fusion
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, embed), nn.ReLU())
            for _ in VIEWS
        )
        self.fuse = cx.WeightedSum(len(VIEWS), sources=VIEWS)
        self.head = nn.Linear(embed, 10)

    def forward(self, views: Tensor, present: Tensor) -> Tensor:
        if self.fusion == "WeightedSum, no mask":  # the model cannot tell missing from zero
            views = views * present[..., None]
        embeddings = [enc(views[:, k]) for k, enc in enumerate(self.encoders)]
        if self.fusion == "WeightedSum + mask":
            fused = self.fuse(embeddings, mask=present)
        elif self.fusion == "masked mean":
            stacked = torch.stack(embeddings, 1) * present[..., None]
            fused = stacked.sum(1) / present.sum(1, keepdim=True).clamp_min(1)
        else:
            fused = self.fuse(embeddings)
        out: Tensor = self.head(fused)
        return out


def random_presence(n: int, p_drop: float, gen: torch.Generator) -> Tensor:
    present = torch.rand(n, len(VIEWS), generator=gen) >= p_drop
    none = ~present.any(1)
    present[none, torch.randint(len(VIEWS), (int(none.sum()),), generator=gen)] = True
    return present


def train(
    fusion: str, data: tuple[Tensor, ...], seed: int, epochs: int, p_drop: float
) -> tuple[MultiViewNet, cx.WeightRecorder]:
    x_train, y_train = data[0], data[1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MultiViewNet(fusion)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    recorder = cx.WeightRecorder({"fusion weights": model.fuse})
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        for batch in order.split(64):
            present = random_presence(len(batch), p_drop, gen)
            loss = nn.functional.cross_entropy(model(x_train[batch], present), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        recorder.record(epoch + 1)
    return model, recorder


@torch.no_grad()
def accuracy(model: MultiViewNet, x: Tensor, y: Tensor, missing: tuple[int, ...]) -> float:
    model.eval()
    present = torch.ones(len(y), len(VIEWS), dtype=torch.bool)
    present[:, list(missing)] = False
    return float((model(x, present).argmax(1) == y).float().mean())


def evaluate(model: MultiViewNet, x: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy with all views, 1 and 2 missing (mean over choices), and 1 view left."""
    out = {"all views": accuracy(model, x, y, ())}
    for label, n_missing in (("1 missing", 1), ("2 missing", 2), ("1 view left", 3)):
        accs = [
            accuracy(model, x, y, m) for m in itertools.combinations(range(len(VIEWS)), n_missing)
        ]
        out[label] = statistics.fmean(accs)
    return out


def main(
    epochs: int = 60,
    seeds: int = 3,
    p_drop: float = 0.3,
    out: str | None = None,
    noise: float = 0.0,
    verbose: bool = True,
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {f: {} for f in FUSIONS}
    weights: list[Tensor] = []
    recorder = None
    for seed in range(seeds):
        data = load_views(seed, noise)
        for fusion in FUSIONS:
            model, rec = train(fusion, data, seed, epochs, p_drop)
            for key, value in evaluate(model, data[2], data[3]).items():
                results[fusion].setdefault(key, []).append(value)
            if fusion == "WeightedSum + mask":
                weights.append(model.fuse.weights.detach())
                recorder = recorder or rec
    if verbose:
        print(table(results, epochs, seeds, p_drop, noise))
        w = torch.stack(weights)
        print("\nlearned fusion weights (WeightedSum + mask), mean over seeds:")
        for name, m, s in zip(
            VIEWS, w.mean(0).tolist(), w.std(0).tolist() if seeds > 1 else [0.0] * 4, strict=True
        ):
            print(f"  {name:<12} {m:.3f} +- {s:.3f}")
    if out is not None and recorder is not None:
        name = "digits_fusion_weights" + (f"_noise{noise:g}" if noise > 0 else "") + ".png"
        title = "digits: fusion weights (seed 0)" + (
            f", bottom-right noise {noise:g}" if noise else ""
        )
        path = recorder.plot(Path(out) / name, title=title, xlabel="epoch")
        if verbose:
            print(f"\nplot: {path}")
    results["_weights"] = {"mean": torch.stack(weights).mean(0).tolist()}
    return results


def table(
    results: dict[str, dict[str, list[float]]], epochs: int, seeds: int, p_drop: float, noise: float
) -> str:
    keys = list(next(iter(results.values())))
    setting = f", bottom-right view + N(0, {noise:g}^2) noise" if noise > 0 else ""
    lines = [
        f"digits, 4 quadrant views{setting}, {epochs} epochs, view dropout {p_drop}, "
        f"{seeds} seed(s): test accuracy % (mean +- std)",
        "",
        "| fusion | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for fusion in FUSIONS:
        cells = []
        for k in keys:
            v = results[fusion][k]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{100 * statistics.fmean(v):.1f} +- {100 * sd:.1f}")
        lines.append(f"| {fusion} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--p-drop", type=float, default=0.3)
    parser.add_argument("--out", default=None, help="folder for the weight-trajectory plot")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="noise std on the bottom-right view"
    )
    args = parser.parse_args()
    main(args.epochs, args.seeds, args.p_drop, args.out, args.noise)
