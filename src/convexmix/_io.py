"""Reading predictions and targets from files for the CLI (private).

Formats: ``.npy``, ``.npz``, ``.csv`` (comma-separated, an optional header row) and
``.parquet`` (with pyarrow). Every failure is a :class:`ConvexMixError` whose message
names the file.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from convexmix.errors import ConvexMixError, ShapeError

__all__: list[str] = []

FORMATS = (".npy", ".npz", ".csv", ".parquet")
#: .npy files larger than this are memory-mapped rather than read.
MMAP_BYTES = 1 << 24


def _numpy() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with the [cli] extra
        raise ConvexMixError(
            "reading prediction files needs numpy: pip install 'convexmix[cli]'"
        ) from None
    return np


def _read_csv(path: Path) -> Any:
    np = _numpy()
    # utf-8-sig: Excel starts its CSV files with a byte-order mark, which would otherwise
    # glue onto the first cell and make the first data row look like a header.
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if row and any(c.strip() for c in row)]
    except UnicodeDecodeError:
        raise ConvexMixError(f"{path}: not a text CSV file (not UTF-8).") from None
    except csv.Error as err:
        raise ConvexMixError(f"{path}: not a readable CSV file ({err}).") from None
    if not rows:
        raise ConvexMixError(f"{path}: the file has no rows.")

    def numbers(row: list[str]) -> list[float] | None:
        try:
            return [float(c) for c in row]
        except ValueError:
            return None

    if numbers(rows[0]) is None:  # a header row
        rows = rows[1:]
        if not rows:
            raise ConvexMixError(f"{path}: the file has a header but no data rows.")
    values = []
    for i, row in enumerate(rows):
        parsed = numbers(row)
        if parsed is None:
            raise ConvexMixError(f"{path}: row {i + 1} is not all numbers: {row[:5]!r}.")
        values.append(parsed)
    widths = {len(r) for r in values}
    if len(widths) != 1:
        raise ShapeError(f"{path}: the rows have different lengths {sorted(widths)}.")
    return np.asarray(values, dtype=np.float64)


def _read_parquet(path: Path) -> Any:
    np = _numpy()
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvexMixError(
            f"{path}: reading .parquet files needs pyarrow: pip install pyarrow"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise ConvexMixError(f"{path}: not a readable parquet file ({err}).") from None
    try:
        cols = [np.asarray(col.to_numpy(), dtype=np.float64) for col in table.columns]
    except (TypeError, ValueError) as err:
        raise ConvexMixError(f"{path}: the columns must be numbers ({err}).") from None
    if not cols:
        raise ConvexMixError(f"{path}: the table has no columns.")
    return np.column_stack(cols)


def read_arrays(path: str | Path) -> list[tuple[str, Any]]:
    """The arrays in a file, as (name, array) pairs: one pair, or one per ``.npz`` entry."""
    _numpy()
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ConvexMixError(
            f"{p}: unknown file type {p.suffix or '(none)'!r}; "
            f"expected one of {', '.join(FORMATS)}."
        )
    if p.is_dir():
        raise ConvexMixError(f"{p}: is a directory; expected a {suffix} file.")
    if not p.is_file():
        raise ConvexMixError(f"{p}: no such file.")
    try:
        return _read(p, suffix)
    except OSError as err:  # unreadable: permissions, I/O errors
        raise ConvexMixError(f"{p}: cannot read the file ({err.strerror or err}).") from None


def _read(p: Path, suffix: str) -> list[tuple[str, Any]]:
    np = _numpy()
    if suffix == ".csv":
        return [(p.stem, _read_csv(p))]
    if suffix == ".parquet":
        return [(p.stem, _read_parquet(p))]
    with p.open("rb") as fh:
        head = fh.read(6)
    if suffix == ".npy" and head != b"\x93NUMPY":
        raise ConvexMixError(f"{p}: not a .npy array file (no NumPy header).")
    if suffix == ".npz" and head[:2] != b"PK":
        raise ConvexMixError(f"{p}: not a .npz archive (not a zip file).")
    try:
        # Large .npy files are memory-mapped (copy-on-write): the ensemble job reads them
        # in row chunks and never needs them whole in memory.
        big = suffix == ".npy" and p.stat().st_size > MMAP_BYTES
        loaded = np.load(p, allow_pickle=False, mmap_mode="c" if big else None)
    except Exception as err:
        raise ConvexMixError(f"{p}: not a {suffix} array file ({err}).") from None
    if suffix == ".npy":
        arrays = [(p.stem, loaded)]
    else:
        with loaded:
            arrays = [(name, loaded[name]) for name in loaded.files]
        if not arrays:
            raise ConvexMixError(f"{p}: the archive holds no arrays.")
    for name, a in arrays:
        if not (np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_)):
            raise ConvexMixError(f"{p}: array {name!r} is not numeric (dtype {a.dtype}).")
    return arrays


def load_predictions(
    paths: Sequence[str | Path], n_samples: int | None = None
) -> tuple[Any, list[str]]:
    """(K, N) or (K, N, C) predictions and K model names.

    One file holds every model: a (K, N) or (K, N, C) array, or an ``.npz`` with one
    (N,) or (N, C) array per model. Several files hold one model each. ``n_samples``
    (the number of targets) turns a likely mix-up into a clear message.
    """
    np = _numpy()
    if not paths:
        raise ConvexMixError("give at least one predictions file.")
    models: list[tuple[str, Any]] = []
    if len(paths) == 1:
        arrays = read_arrays(paths[0])
        if len(arrays) == 1:
            name, a = arrays[0]
            if a.ndim not in (2, 3):
                raise ShapeError(
                    f"{paths[0]}: a single predictions file must be (K, N) or (K, N, C) "
                    f"for K models; got shape {a.shape}. Give one file per model instead."
                )
            if a.ndim == 2 and n_samples is not None and a.shape[1] != n_samples == a.shape[0]:
                raise ShapeError(
                    f"{paths[0]}: a single predictions file is read as (K models, N samples); "
                    f"got shape {a.shape} and {n_samples} targets, which looks like one "
                    "model's (N, C). Give one file per model."
                )
            return a, [f"model {k}" for k in range(a.shape[0])]
        models = arrays
    else:
        for path in paths:
            arrays = read_arrays(path)
            if len(arrays) != 1:
                raise ConvexMixError(
                    f"{path}: with several predictions files, each holds one model; "
                    f"got {len(arrays)} arrays."
                )
            models.append((Path(path).stem, arrays[0][1]))
    fixed = []
    for name, a in models:
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim not in (1, 2):
            raise ShapeError(
                f"{name}: one model's predictions must be (N,) or (N, C); got shape {a.shape}."
            )
        fixed.append(a)
    shapes = {a.shape for a in fixed}
    if len(shapes) != 1:
        detail = ", ".join(f"{n}: {a.shape}" for (n, _), a in zip(models, fixed, strict=True))
        raise ShapeError(f"every model's predictions must have the same shape; got {detail}.")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        names = [f"{n} ({k})" for k, n in enumerate(names)]
    return np.stack(fixed), names


def load_targets(path: str | Path) -> Any:
    """(N,) targets from a file holding one (N,) or (N, 1) array."""
    arrays = read_arrays(path)
    if len(arrays) != 1:
        names = [n for n, _ in arrays]
        picked = [a for n, a in arrays if n in ("targets", "y")]
        if len(picked) != 1:
            raise ConvexMixError(
                f"{path}: the archive holds {names}; name the targets 'targets' or 'y'."
            )
        a = picked[0]
    else:
        a = arrays[0][1]
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ShapeError(f"{path}: targets must be (N,) or (N, 1); got shape {a.shape}.")
    return a


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``:
    a failure (or an interrupt) leaves no partial output."""
    from convexmix._files import atomic_path  # errors name the path; umask permissions

    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def save_array(path: str | Path, array: Any) -> Path:
    """Write a (N,) or (N, C) array as ``.npy``, ``.csv`` or ``.parquet`` (by extension),
    atomically."""
    np = _numpy()
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".csv", ".parquet"):
        raise ConvexMixError(
            f"{out}: unknown output type {out.suffix or '(none)'!r}; "
            "expected .npy, .csv or .parquet."
        )
    a = np.asarray(array)
    columns = ["blend"] if a.ndim == 1 else [f"class_{c}" for c in range(a.shape[1])]
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConvexMixError(
                f"{out}: writing .parquet files needs pyarrow: pip install pyarrow"
            ) from None
    a2 = a[:, None] if a.ndim == 1 else a

    def write(tmp: Path) -> None:
        if suffix == ".npy":
            with tmp.open("wb") as fh:
                np.save(fh, a)
        elif suffix == ".csv":
            np.savetxt(tmp, a2, delimiter=",", header=",".join(columns), comments="", fmt="%.17g")
        else:
            table = pa.table({name: a2[:, j] for j, name in enumerate(columns)})
            pq.write_table(table, tmp)

    return write_atomic(out, write)
