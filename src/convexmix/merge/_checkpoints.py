"""``merge_checkpoints``: merge safetensors checkpoints by a mergekit configuration,
streamed tensor by tensor (private module; ``convexmix.merge`` exports it)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from convexmix._optional import require
from convexmix.errors import ConvexMixError, ShapeError
from convexmix.functional import convex_combination
from convexmix.merge._config import Spec, coefficients, depths, read_config
from convexmix.merge._files import (
    Checkpoint,
    Entry,
    Sink,
    Staging,
    atomic_folder,
    copy_other_files,
    write_shards,
)

__all__ = ["merge_checkpoints"]

#: Elements combined at a time: the merge holds a few such chunks (2 MiB each in bf16),
#: small enough to stay in the cache between the kernel that writes one and the write
#: that copies it into the page cache, and few pages to touch (fresh pages cost).
CHUNK = 1 << 20
#: Output buffers: one being filled, the others queued for the writing thread.
STAGING = 3
#: mergekit's default shard size, in bytes.
DEFAULT_SHARD_SIZE = 5_000_000_000


def merge_checkpoints(
    config: Mapping[str, Any] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool | None = None,
    force: bool = False,
) -> Path:
    r"""Merge safetensors checkpoints as a mergekit configuration says, into ``out``.

    The configuration (a mapping, or the path of a YAML file) is mergekit's subset for
    ``merge_method: linear`` (``sum_i w_i theta_i``, divided by ``sum_i w_i`` unless
    ``normalize: false``) and ``merge_method: task_arithmetic``
    (``theta_base + lambda * sum_i w_i (theta_i - theta_base)``, divided by
    ``sum_i w_i`` only with ``normalize: true``), with per-model ``weight``\ s given as
    numbers, gradients over the layers or filter rules, and ``dtype`` / ``out_dtype``
    (the output's dtype; the arithmetic is float32, float64 for float64 tensors, rounded
    once). Any other key is an error that names it. See the merging guide for the rules.

    Checkpoints are local paths: a ``.safetensors`` file, or a folder with
    ``model.safetensors`` or with ``model.safetensors.index.json`` and its shards. Every
    model must hold the same tensor names, shapes and dtypes (with ``dtype`` set, floating
    dtypes may differ); integer tensors are copied from the first model. This is checked
    before anything is written, and errors name the file and the tensor.

    Memory and time: tensors are memory-mapped and combined in chunks of 2^20 elements
    with the fused :func:`~convexmix.functional.convex_combination`, into a few reused
    buffers that a second thread writes to the file while the next chunk is combined, so
    the process holds a few chunks whatever the model's size; the input files cost page
    cache only.

    The output has the first model's layout: ``model.safetensors``, or shards of at most
    ``shard_size`` bytes and an index, plus the first model's other files
    (``config.json``, tokenizer files). It is written into a temporary folder beside
    ``out`` that is renamed to ``out`` at the end: an interrupted merge leaves nothing
    under ``out``.

    Args:
        config: the configuration, a mapping or a YAML file's path.
        out: the output folder; it must not exist or be empty, unless ``force``.
        shard_size: the most bytes per output file (a larger tensor gets a file alone).
        progress: show a progress bar (rich) over tensors and bytes; None: when stderr
            is a terminal.
        force: replace an existing, non-empty ``out``.

    Returns:
        The output folder.

    Raises:
        ConvexMixError: a configuration outside the subset, a missing checkpoint, models
            that do not match (ShapeError), an existing ``out``.

    Example:
        >>> import os, tempfile, torch, convexmix as cx
        >>> from safetensors.torch import save_file
        >>> tmp = tempfile.mkdtemp()
        >>> for k in range(2):
        ...     save_file({"w": torch.full((2,), float(k))}, os.path.join(tmp, f"m{k}.safetensors"))
        >>> config = {
        ...     "merge_method": "linear",
        ...     "models": [
        ...         {"model": os.path.join(tmp, "m0.safetensors"), "parameters": {"weight": 1.0}},
        ...         {"model": os.path.join(tmp, "m1.safetensors"), "parameters": {"weight": 3.0}},
        ...     ],
        ... }
        >>> out = cx.merge.merge_checkpoints(config, os.path.join(tmp, "merged"))
        >>> from safetensors.torch import load_file
        >>> load_file(os.path.join(out, "model.safetensors"))["w"]
        tensor([0.7500, 0.7500])
    """
    spec = read_config(config)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConvexMixError(f"shard_size must be an int >= 1 (bytes); got {shard_size!r}.")
    paths = list(spec.models)
    if spec.base is not None and spec.base_index is None:
        paths.append(spec.base)
    labels = [f"models[{k}]" for k in range(len(spec.models))] + ["base_model"]
    checkpoints = [Checkpoint(p, labels[i]) for i, p in enumerate(paths)]
    try:
        plan = _plan(spec, checkpoints)
        total = sum(e.nbytes for e, _ in plan.values())
        buffers = _Buffers(plan.values())
        with (
            atomic_folder(out, force=force) as folder,
            _progress(progress, len(plan), total) as tick,
        ):

            def fill(entry: Entry, sink: Sink) -> None:
                _, coefs = plan[entry.name]
                _write_tensor(sink, entry, coefs, checkpoints, buffers)
                tick(entry.nbytes)

            write_shards(folder, [e for e, _ in plan.values()], shard_size, fill)
            copy_other_files(checkpoints[0].folder, folder, spec.out_dtype or spec.dtype)
    finally:
        for c in checkpoints:
            c.close()
    return Path(out)


def _plan(spec: Spec, checkpoints: list[Checkpoint]) -> dict[str, tuple[Entry, list[float]]]:
    """Check that the models match, and give every output tensor its entry (name, dtype,
    shape) and coefficients (one per checkpoint), before anything is written."""
    first = checkpoints[0]
    for c in checkpoints[1:]:
        missing = [n for n in first.entries if n not in c.entries]
        extra = [n for n in c.entries if n not in first.entries]
        if missing or extra:
            name = (missing or extra)[0]
            where = c.label if missing else f"{c.label} ({c.entries[name].file})"
            raise ShapeError(
                f"{where} ({c.path}) "
                + (
                    f"lacks tensor {name!r}"
                    if missing
                    else f"has tensor {name!r}, which {first.label} ({first.path}) lacks"
                )
                + f" ({len(missing) + len(extra)} tensor name(s) differ)."
            )
        for name, e in first.entries.items():
            o = c.entries[name]
            if o.shape != e.shape:
                raise ShapeError(
                    f"{o.file}: tensor {name!r} has shape {o.shape}, but {e.file} has {e.shape}."
                )
            convert = spec.dtype is not None and o.dtype.is_floating_point
            if o.dtype != e.dtype and not (convert and e.dtype.is_floating_point):
                raise ShapeError(
                    f"{o.file}: tensor {name!r} has dtype {o.dtype}, but {e.file} has "
                    f"{e.dtype}; set dtype: in the configuration to merge floating dtypes."
                )
    names = list(first.entries)
    t = depths(names)
    out_dtype = spec.out_dtype or spec.dtype
    plan = {}
    for name in names:
        e = first.entries[name]
        coefs = coefficients(spec, name, t[name])
        if spec.method == "task_arithmetic" and spec.base_index is not None:
            coefs[spec.base_index] += coefs.pop()  # the base is one of the models
        dtype = out_dtype if out_dtype is not None and e.dtype.is_floating_point else e.dtype
        plan[name] = (Entry(name, e.file, dtype, e.shape), coefs)
    return plan


class _Buffers:
    """The merge's reused memory: the :class:`Staging` output buffers (a chunk of the
    widest floating output dtype each) and one float32/float64 buffer per dtype for
    the chunks that combine in another dtype than they are written in."""

    def __init__(self, plan: Any) -> None:
        size = max((e.dtype.itemsize for e, _ in plan if e.dtype.is_floating_point), default=1)
        largest = max((_numel(e) for e, _ in plan), default=1)
        self.chunk = max(1, min(CHUNK, largest))
        self.staging = Staging(self.chunk * size, STAGING)
        self._scratch: dict[torch.dtype, Tensor] = {}

    def scratch(self, dtype: torch.dtype, n: int) -> Tensor:
        buffer = self._scratch.get(dtype)
        if buffer is None:
            buffer = self._scratch[dtype] = torch.empty(self.chunk, dtype=dtype)
        return buffer[:n]


def _numel(entry: Entry) -> int:
    n = 1
    for s in entry.shape:
        n *= s
    return n


def _write_tensor(
    sink: Sink,
    entry: Entry,
    coefs: list[float],
    checkpoints: list[Checkpoint],
    buffers: _Buffers,
) -> None:
    """Stream one merged tensor to ``sink``, chunk by chunk."""
    name, out_dtype = entry.name, entry.dtype
    if not out_dtype.is_floating_point:  # integer tensors: the first model's
        sink.write(checkpoints[0].tensor(name).contiguous())
        return
    active = [(c, k) for k, c in enumerate(coefs) if c != 0.0]
    n = _numel(entry)
    if not active:
        zeros = torch.zeros(min(n, CHUNK), dtype=out_dtype)
        for a in range(0, n, CHUNK):
            sink.write(zeros[: min(CHUNK, n - a)])
        return
    xs = [checkpoints[k].tensor(name).reshape(-1) for _, k in active]
    if len(xs) == 1 and active[0][0] == 1.0 and xs[0].dtype == out_dtype:
        for a in range(0, n, CHUNK):  # one model with weight 1: its bytes
            sink.write(xs[0][a : a + CHUNK])
        return
    wide = out_dtype == torch.float64 or any(x.dtype == torch.float64 for x in xs)
    acc = torch.float64 if wide else torch.float32
    w = torch.tensor([c for c, _ in active], dtype=acc)
    same = all(x.dtype == xs[0].dtype for x in xs)
    # The kernel's dtype: the inputs' own where they share one that is the output's or
    # the accumulation's (half precision accumulates in float32 inside the kernel),
    # else everything converted to the accumulation dtype.
    direct = same and xs[0].dtype in (acc, out_dtype)
    dtype = xs[0].dtype if direct else acc
    staging = buffers.staging
    for a in range(0, n, CHUNK):
        parts = [x[a : a + CHUNK] for x in xs]
        m = parts[0].numel()
        if not direct:
            parts = [p.to(acc) for p in parts]
        buffer = staging.get()
        try:
            res = buffer[: m * out_dtype.itemsize].view(out_dtype)
            # The out= form runs the fused kernel whatever the size.
            if dtype == out_dtype:
                convex_combination(w, parts, out=res)
            else:  # rounded once, into the output buffer
                res.copy_(convex_combination(w, parts, out=buffers.scratch(dtype, m)))
        except BaseException:
            staging.put(buffer)
            raise
        sink.write(res, done=functools.partial(staging.put, buffer))


@contextlib.contextmanager
def _progress(show: bool | None, n_tensors: int, n_bytes: int) -> Iterator[Any]:
    """A callable that advances a progress bar (rich) by one tensor of ``nbytes``."""
    if show is None:
        show = sys.stderr.isatty() and _has_rich()
    if not show:
        yield lambda nbytes: None
        return
    rp = require("rich.progress", purpose="the merge's progress bar")
    console = require("rich.console", purpose="the merge's progress bar").Console(stderr=True)
    columns = (
        rp.TextColumn("merging"),
        rp.BarColumn(),
        rp.TextColumn("{task.fields[tensors]}/" + str(n_tensors) + " tensors"),
        rp.DownloadColumn(),
        rp.TransferSpeedColumn(),
        rp.TimeRemainingColumn(),
    )
    with rp.Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("merge", total=n_bytes, tensors=0)
        done = [0]

        def tick(nbytes: int) -> None:
            done[0] += 1
            bar.update(task, advance=nbytes, tensors=done[0])

        yield tick


def _has_rich() -> bool:
    try:
        require("rich.progress")
    except ImportError:
        return False
    return True
