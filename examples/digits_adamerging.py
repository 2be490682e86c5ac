"""AdaMerging on scikit-learn's digits: task arithmetic with coefficients learned
without labels, by minimising the entropy of the merged model's predictions.

    python examples/digits_adamerging.py [--seeds 3] [--steps 200] [--out docs/figures]

The setting of AdaMerging (Yang et al., 2024), shrunk to the digits: a "pre-trained"
body (an MLP 64 -> 128 -> 128 -> 64 trained for 3 epochs on half of the training split,
all ten digits) is fine-tuned on three tasks, digits 0-2, 3-5 and 6-9, each with its own
classification head. The bodies' task vectors ``tau_k = theta_k - theta_base`` are
merged; the heads are not (each task keeps its own, as in AdaMerging). A method's score
is the mean over tasks of the test accuracy within each task (its images, its head):

* the pre-trained body and each fine-tuned body, with every task's head;
* uniform soup: the plain average of the fine-tuned bodies (task arithmetic, scale 1);
* task arithmetic, lambda = 0.3 (Ilharco et al., 2023): ``theta_base + 0.3 sum_k tau_k``,
  that is ``scale = 0.3 K`` with uniform weights in ``LearnedMerge``'s terms;
* task arithmetic, scale = 0.3: ``theta_base + 0.3 mean_k tau_k``;
* AdaMerging, task-wise: ``LearnedMerge(granularity="global", scale="learn")``;
* AdaMerging, layer-wise: ``LearnedMerge(granularity="per_module",
  scale="learn_per_group")``: one coefficient ``lambda_{l,k} = s_l w_{l,k}`` per layer l
  and task k.

The AdaMerging rows start from task arithmetic (lambda = 0.3) and learn their
coefficients with Adam on the sum over tasks of ``cx.merge.entropy_loss`` of the test
images: no label is used after fine-tuning, only which task an image belongs to. The
figure (``--out``) shows the learned layer-wise coefficients of the first seed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

import convexmix as cx

TASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


def body() -> nn.Module:
    """The shared network that is merged (heads are per task, as in AdaMerging)."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()
    )


def fit(
    net: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(head(net(x[idx])), y[idx]).backward()
            opt.step()


class Tasks:
    """The test split cut into tasks: images, labels within the task, and the heads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, heads: list[nn.Module]) -> None:
        self.rows = [torch.isin(y, torch.tensor(t)).nonzero().squeeze(1) for t in TASKS]
        order = torch.cat(self.rows)
        self.x = x[order]  # all test images, grouped by task: one forward for all tasks
        self.y = [_local(y[r], t) for r, t in zip(self.rows, TASKS, strict=True)]
        self.sizes = [len(r) for r in self.rows]
        self.heads = heads

    def logits(self, net: nn.Module) -> list[torch.Tensor]:
        parts = net(self.x).split(self.sizes)
        return [head(h) for head, h in zip(self.heads, parts, strict=True)]

    def entropy(self, net: nn.Module) -> torch.Tensor:
        """AdaMerging's objective: the sum over tasks of the mean prediction entropy."""
        return sum((cx.merge.entropy_loss(z) for z in self.logits(net)), torch.zeros(()))

    @torch.no_grad()
    def accuracy(self, net: nn.Module) -> float:
        """Average over tasks of the accuracy within each task (its own head)."""
        zs = self.logits(net)
        accs = [float((z.argmax(1) == y).float().mean()) for z, y in zip(zs, self.y, strict=True)]
        return sum(accs) / len(accs)


def _local(y: torch.Tensor, labels: tuple[int, ...]) -> torch.Tensor:
    """Digit labels -> indices within a task's labels."""
    return torch.tensor([labels.index(int(v)) for v in y])


def adamerging(
    base: nn.Module,
    models: list[nn.Module],
    tasks: Tasks,
    *,
    layer_wise: bool,
    steps: int,
    lr: float = 0.01,
) -> tuple[cx.merge.LearnedMerge, list[float]]:
    """Learn the weights and scale(s) from the entropy of the predictions alone."""
    merge = cx.merge.LearnedMerge(
        models,
        base=base,
        granularity="per_module" if layer_wise else "global",
        scale="learn_per_group" if layer_wise else "learn",
        scale_init=0.3 * len(models),  # starts at task arithmetic, lambda = 0.3
    )
    opt = torch.optim.Adam(merge.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = tasks.entropy(merge)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return merge.eval(), history


def run_seed(seed: int, epochs: int, steps: int, lr: float = 0.001) -> dict[str, Any]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X / 16.0, y, test_size=0.4, stratify=y, random_state=seed
    )
    xt, xe = (torch.tensor(a, dtype=torch.float32) for a in (X_tr, X_te))
    yt, ye = torch.tensor(y_tr), torch.tensor(y_te)
    torch.manual_seed(seed)
    # the "pre-trained" body: a few epochs on half of the training split, all ten digits
    half = len(xt) // 2
    base = body()
    fit(base, nn.Linear(64, 10), xt[:half], yt[:half], epochs=3, lr=0.05, seed=seed)
    models, heads = [], []
    for k, labels in enumerate(TASKS):
        keep = torch.isin(yt, torch.tensor(labels))
        net, head = body(), nn.Linear(64, len(labels))
        net.load_state_dict(base.state_dict())
        fit(net, head, xt[keep], _local(yt[keep], labels), epochs=epochs, lr=0.01, seed=seed + k)
        models.append(net)
        heads.append(head.requires_grad_(False))
    tasks = Tasks(xe, ye, heads)
    K = len(models)
    task_wise, _ = adamerging(base, models, tasks, layer_wise=False, steps=steps, lr=lr)
    layer_wise, history = adamerging(base, models, tasks, layer_wise=True, steps=steps, lr=lr)
    merged: dict[str, nn.Module] = {
        "pre-trained base": base,
        **{f"fine-tuned on {','.join(map(str, t))}": m for t, m in zip(TASKS, models, strict=True)},
        "uniform soup": cx.merge.LearnedMerge(models),
        "task arithmetic, lambda=0.3": cx.merge.LearnedMerge(models, base=base, scale=0.3 * K),
        "task arithmetic, scale=0.3": cx.merge.LearnedMerge(models, base=base, scale=0.3),
        "AdaMerging task-wise (learned)": task_wise,
        "AdaMerging layer-wise (learned)": layer_wise,
    }
    with torch.no_grad():
        entropy = {name: float(tasks.entropy(m)) for name, m in merged.items()}
    coefficients = (layer_wise.scale[:, None] * layer_wise.weights).detach()  # (layers, K)
    return {
        "accuracy": {name: tasks.accuracy(m) for name, m in merged.items()},
        "entropy": entropy,
        "coefficients": coefficients,
        "layers": list(layer_wise.group_names),
        "task_wise": (task_wise.scale * task_wise.weights).detach(),
        "history": history,
        "checkpoints": (base, models, layer_wise),
    }


def export(result: dict[str, Any], folder: str) -> float:
    """Write the base and the fine-tuned bodies as safetensors checkpoints, the layer-wise
    coefficients as a mergekit configuration, merge the checkpoints with it, and return
    the largest difference from the learned merge's own state_dict."""
    from safetensors.torch import save_file

    base, models, merge = result["checkpoints"]
    paths = []
    for name, net in [("base", base), *((f"task{k}", m) for k, m in enumerate(models))]:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        save_file(net.state_dict(), os.path.join(folder, name, "model.safetensors"))
        paths.append(os.path.join(folder, name))
    config = merge.save_config(os.path.join(folder, "adamerging.yml"), paths[1:], paths[0])
    merged = cx.merge.merge_checkpoints(config, os.path.join(folder, "merged"), force=True)
    from safetensors.torch import load_file

    written = load_file(os.path.join(merged, "model.safetensors"))
    expected = merge.merged_state_dict()
    return max(float((written[n] - t).abs().max()) for n, t in expected.items())


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coef, layers = result["coefficients"], result["layers"]
    L, K = coef.shape
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / K
    for k in range(K):
        xs = [i + (k - (K - 1) / 2) * width for i in range(L)]
        label = "task " + ",".join(map(str, TASKS[k]))
        ax.bar(xs, coef[:, k].tolist(), width=width, label=label)
    ax.axhline(0.3, color="k", ls="--", lw=1, label="task arithmetic (0.3)")
    ax.set_ylim(0, 1.35 * max(float(coef.max()), 0.3))  # room for the legend
    ax.set_xticks(range(L))
    ax.set_xticklabels([f"layer {i + 1}\n(net.{name})" for i, name in enumerate(layers)])
    ax.set_ylabel(r"$\lambda_{l,k} = s_l\, w_{l,k}$")
    ax.set_title("AdaMerging on digits: layer-wise coefficients learned without labels")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    seeds: int = 3,
    epochs: int = 12,
    steps: int = 200,
    out: str | None = None,
    verbose: bool = True,
    lr: float = 0.001,
    export_to: str | None = None,
) -> dict[str, Any]:
    runs = [run_seed(s, epochs, steps, lr) for s in range(seeds)]
    if export_to is not None:
        diff = export(runs[0], export_to)
        if verbose:
            print(
                f"exported seed 0's layer-wise merge to {export_to}/adamerging.yml and merged "
                f"the checkpoints into {export_to}/merged: largest difference from "
                f"merged_state_dict() {diff:.1e}\n"
            )
    names = list(runs[0]["accuracy"])
    table = {
        name: (
            sum(r["accuracy"][name] for r in runs) / seeds,
            sum(r["entropy"][name] for r in runs) / seeds,
        )
        for name in names
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        plot(runs[0], os.path.join(out, "digits_adamerging.png"))
    if verbose:
        print(f"digits, {len(TASKS)} tasks {TASKS}, mean over {seeds} seeds (test split)\n")
        print("| method | mean task accuracy | summed task entropy |")
        print("|---|---|---|")
        for name, (acc, ent) in table.items():
            print(f"| {name} | {100 * acc:.2f}% | {ent:.3f} |")
        print("\nlayer-wise coefficients lambda_{l,k} (seed 0), rows = layers:")
        for name, row in zip(runs[0]["layers"], runs[0]["coefficients"], strict=True):
            print(f"  net.{name}: " + ", ".join(f"{v:.3f}" for v in row.tolist()))
        print("task-wise coefficients (seed 0): " + str(runs[0]["task_wise"].tolist()))
    return {"table": table, "runs": runs}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.001, help="Adam's step for AdaMerging")
    parser.add_argument("--out", default=None, help="folder for digits_adamerging.png")
    parser.add_argument(
        "--export", default=None, metavar="DIR", help="write checkpoints, config and merge"
    )
    args = parser.parse_args()
    main(args.seeds, args.epochs, args.steps, args.out, lr=args.lr, export_to=args.export)
