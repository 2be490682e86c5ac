"""Sum errors of every map, per dtype: max |sum(p) - total| over random and extreme inputs.

    python benchmarks/precision.py

Prints one table (markdown). Inputs: 8 rows of K logits drawn N(0, s^2) for s in
{1e-3, 1, 30, 1e4}, plus rows with -inf entries; total in {1, 3}. The sum is taken
in float64 of the output as returned (so half-precision rounding counts).
"""

from __future__ import annotations

import math

import torch

import convexmix as cx

F = cx.functional
MAPS = {
    "softmax": F.softmax,
    "sparsemax": F.sparsemax,
    "entmax15": F.entmax15,
    "entmax(1.3)": lambda x, total: F.entmax(x, 1.3, total=total),
    "stick_breaking": lambda x, total: F.stick_breaking(x[..., :-1], total=total),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def worst_error(f, k: int, dtype: torch.dtype) -> float:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(k)
    worst = 0.0
    for scale in (1e-3, 1.0, 30.0, 1e4):
        x = torch.randn(8, k, generator=gen, dtype=torch.float64) * scale
        x[4:, ::3] = -math.inf
        x = x.clamp(-6e4, 6e4).to(dtype)  # float16 holds +-65504
        for total in (1.0, 3.0):
            p = f(x, total=total)
            assert torch.isfinite(p).all()
            assert (p >= 0).all()
            worst = max(worst, (p.double().sum(-1) - total).abs().max().item() / total)
    return worst


def main() -> None:
    ks = [10, 1000, 100_000]
    print("| map | dtype | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for name, f in MAPS.items():
        for dtype in DTYPES:
            errs = [worst_error(f, k, dtype) for k in ks]
            print(
                f"| {name} | {str(dtype).replace('torch.', '')} | "
                + " | ".join(f"{e:.1e}" for e in errs)
                + " |"
            )


if __name__ == "__main__":
    main()
