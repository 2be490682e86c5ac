"""Reading predictions and targets from files for the CLI (private).

Formats: ``.npy``, ``.npz``, ``.csv`` (comma-separated, an optional header row) and
``.parquet`` (with pyarrow). Every failure is a :class:`ConvexMixError` whose message
names the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convexmix._files import atomic_path
from convexmix._optional import require
from convexmix.errors import ConvexMixError, ShapeError

__all__: list[str] = []

FORMATS = (".npy", ".npz", ".csv", ".parquet")
#: .npy files larger than this are memory-mapped rather than read.
MMAP_BYTES = 1 << 24


def _numpy() -> Any:
    return require("numpy", purpose="reading and writing prediction files")


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
    pq = require("pyarrow.parquet", purpose=f"{path}: reading .parquet files")
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


@dataclass
class Predictions:
    """(K, N) or (K, N, C) predictions, the K models' names and whether the names are
    real (from file names, ``.npz`` keys or ``--names``) or placeholders ("model k",
    for a stacked array that names no model)."""

    array: Any
    names: list[str]
    named: bool


def _unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Each file's stem; where stems collide (``a/p.npy``, ``b/p.npy``), as many trailing
    folders as make them unique (``a/p``, ``b/p``)."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    names = [part[-1] for part in parts]
    depth = 1
    while len(set(names)) != len(names) and depth < max(len(p) for p in parts):
        depth += 1
        names = ["/".join(part[-depth:]) for part in parts]
    return names


def check_names(names: Sequence[str], count: int, what: str) -> list[str]:
    """``names`` if they are ``count`` distinct non-empty strings."""
    if len(names) != count:
        raise ConvexMixError(f"{what}: got {len(names)} names for {count} models.")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ConvexMixError(f"{what}: every model name must be a non-empty string.")
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise ConvexMixError(
            f"{what}: the model names must differ; {sorted(set(seen))} appear more than once."
        )
    return list(names)


def load_predictions(
    paths: Sequence[str | Path],
    n_samples: int | None = None,
    names: Sequence[str] | None = None,
) -> Predictions:
    """(K, N) or (K, N, C) predictions and the K models' names.

    One file holds every model: a (K, N) or (K, N, C) array (its models are unnamed:
    "model 0", "model 1", ...), or an ``.npz`` with one (N,) or (N, C) array per model
    (named by its keys). Several files hold one model each (named by the file names).
    ``names`` (the CLI's ``--names``) overrides the names, in the models' order.
    ``n_samples`` (the number of targets) turns a likely mix-up into a clear message.
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
            if names is not None:
                return Predictions(a, check_names(names, a.shape[0], "--names"), True)
            return Predictions(a, [f"model {k}" for k in range(a.shape[0])], False)
        models = arrays
    else:
        ids = [Path(os.path.realpath(p)) for p in paths]
        twice = sorted({str(p) for i, p in enumerate(paths) if ids[i] in ids[:i]})
        if twice:
            raise ConvexMixError(f"the same predictions file is given twice: {', '.join(twice)}.")
        for path, name in zip(paths, _unique_names(paths), strict=True):
            arrays = read_arrays(path)
            if len(arrays) != 1:
                raise ConvexMixError(
                    f"{path}: with several predictions files, each holds one model; "
                    f"got {len(arrays)} arrays."
                )
            models.append((name, arrays[0][1]))
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
    found = [n for n, _ in models] if names is None else list(names)
    what = "the model names" if names is None else "--names"
    return Predictions(np.stack(fixed), check_names(found, len(fixed), what), True)


def match_models(
    fitted: Sequence[str], fitted_named: bool, given: Predictions, weights_path: str | Path
) -> list[int]:
    """For each fitted model, the index of its predictions in ``given``.

    Named fits match by name: the same names, each once (any order). A fit whose names
    are placeholders (fitted on one stacked array, or a weights file that records none)
    matches by position. A named fit given unnamed predictions (a stacked array) is
    refused: ``--names`` names them.
    """
    K, where = len(fitted), str(weights_path)
    if len(given.names) != K:
        raise ConvexMixError(
            f"{where} holds weights for {K} models ({', '.join(fitted)}); the predictions "
            f"hold {len(given.names)} ({', '.join(given.names)})."
        )
    if not fitted_named:
        return list(range(K))
    if not given.named:
        raise ConvexMixError(
            f"{where} was fitted on the models {', '.join(fitted)}; the predictions name no "
            "models (one stacked array): give --names in the array's order."
        )
    unknown = [n for n in given.names if n not in fitted]
    missing = [n for n in fitted if n not in given.names]
    if unknown or missing:
        raise ConvexMixError(
            f"the predictions' models do not match those of {where}: "
            + "; ".join(
                part
                for part in (
                    f"not in the fit: {', '.join(unknown)}" if unknown else "",
                    f"missing: {', '.join(missing)}" if missing else "",
                )
                if part
            )
            + " (models are matched by name: file names, .npz keys or --names)."
        )
    return [given.names.index(n) for n in fitted]


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


def write_atomic(
    path: str | Path, write: Callable[[Path], object], inputs: Sequence[str | Path] = ()
) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``
    (see :mod:`convexmix._files`: a failure or an interrupt leaves no partial output, and
    ``path`` must not be one of the ``inputs``)."""
    with atomic_path(path, inputs) as tmp:
        write(tmp)
    return Path(path)


def save_array(path: str | Path, array: Any, inputs: Sequence[str | Path] = ()) -> Path:
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
        pa = require("pyarrow", purpose=f"{out}: writing .parquet files")
        pq = require("pyarrow.parquet", purpose=f"{out}: writing .parquet files")
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

    return write_atomic(out, write, inputs)
