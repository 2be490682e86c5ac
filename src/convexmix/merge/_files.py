"""Checkpoints on disk (private): safetensors models in the Hugging Face layouts, read
tensor by tensor from memory maps, and written shard by shard into a folder that appears
all at once.

Layouts: a single ``.safetensors`` file; a folder with ``model.safetensors``; a folder of
shards listed by ``model.safetensors.index.json`` (its ``weight_map``). Output shards are
written without ever holding a shard in memory: the header (names, dtypes, shapes,
offsets) is known before the first byte of data, so each tensor's bytes are streamed to
the file as they are produced, by a second thread (:class:`Sink`) while the next ones
are computed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from convexmix._optional import require
from convexmix.errors import ConvexMixError
from convexmix.merge._ingredients import ST_DTYPES

__all__: list[str] = []

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
#: files of a model folder that hold weights in other formats: never copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: its name, file, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """A safetensors model on disk: its tensors by name (:class:`Entry`, in file order),
    the folder its other files sit in, and memory-mapped reads (:meth:`tensor`).

    Args:
        path: a ``.safetensors`` file, or a folder with ``model.safetensors`` or with
            ``model.safetensors.index.json`` and its shards.
        label: how messages name it (e.g. ``"models[1]"``).
    """

    def __init__(self, path: str | os.PathLike[str], label: str) -> None:
        self.path = Path(path)
        self.label = label
        self._handles: dict[Path, Any] = {}
        files, weight_map = self._locate()
        self.folder: Path | None = self.path if self.path.is_dir() else None
        self.entries: dict[str, Entry] = {}
        for file in files:
            handle = self._open(file)
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if weight_map is not None and weight_map.get(key) != file.name:
                    continue
                view = handle.get_slice(key)
                dtype = ST_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise ConvexMixError(
                        f"{file}: tensor {key!r} has dtype {view.get_dtype()}, which "
                        f"convexmix does not merge (supported: {sorted(ST_DTYPES)})."
                    )
                self.entries[key] = Entry(key, file, dtype, tuple(view.get_shape()))
        if weight_map is not None:
            absent = [k for k in weight_map if k not in self.entries]
            if absent:
                raise ConvexMixError(
                    f"{self.path / INDEX} lists tensor {absent[0]!r} in "
                    f"{weight_map[absent[0]]}, which does not hold it"
                    + (f" ({len(absent)} such tensors)." if len(absent) > 1 else ".")
                )

    def _locate(self) -> tuple[list[Path], dict[str, str] | None]:
        p = self.path
        if p.is_file():
            return [p], None
        if not p.is_dir():
            raise ConvexMixError(
                f"{self.label}: {str(p)!r} is neither a .safetensors file nor a folder "
                "(convexmix merges local safetensors checkpoints)."
            )
        index = p / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConvexMixError(f"{index}: not a safetensors index ({err}).") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ConvexMixError(f"{index}: weight_map must map tensor names to files.")
            files = [p / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise ConvexMixError(f"{index} names {file.name}, which does not exist.")
            return files, weight_map
        if (p / SINGLE).is_file():
            return [p / SINGLE], None
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found, None
        raise ConvexMixError(
            f"{self.label}: {str(p)!r} has no {SINGLE} or {INDEX}"
            + (f" (and {len(found)} other .safetensors files)." if found else ".")
        )

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            safe_open = require("safetensors", purpose="merging safetensors checkpoints").safe_open
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise ConvexMixError(f"{file} is not a readable safetensors file: {err}") from None
        return self._handles[file]

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name``, a view of the file's memory map (nothing is read yet)."""
        entry = self.entries[name]
        out: Tensor = self._open(entry.file).get_tensor(name)
        return out

    def close(self) -> None:
        """Drop the memory maps."""
        self._handles.clear()


def raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (valid while ``t`` lives)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def plan_shards(entries: Sequence[Entry], shard_size: int) -> list[list[Entry]]:
    """Consecutive groups of at most ``shard_size`` bytes (a larger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else Hugging Face's numbered names."""
    if n == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class Staging:
    """``count`` reusable output buffers of ``nbytes`` bytes each (allocated on first
    use): a merge fills one while the :class:`Sink` writes the others, and its memory
    stays at these few buffers, whose pages are touched once, not once per tensor.
    Thread-safe; :meth:`get` waits until a buffer is free."""

    def __init__(self, nbytes: int, count: int) -> None:
        self.nbytes = nbytes
        self._free: list[Tensor] = []
        self._left = count
        self._cond = threading.Condition()

    def get(self) -> Tensor:
        """A free buffer (uint8, ``nbytes``); give it back with :meth:`put`."""
        with self._cond:
            while not self._free and not self._left:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._left -= 1
        return torch.empty(self.nbytes, dtype=torch.uint8)

    def put(self, buffer: Tensor) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()


class Sink:
    """A file that a background thread writes: :meth:`write` queues a tensor's bytes and
    returns, so the next chunk is combined while the operating system copies these into
    the page cache (on two cores the two overlap; the writes are about a quarter of a
    merge's CPU time). At
    most ``depth`` writes wait in the queue. Each queued tensor stays alive until
    written, then its ``done`` callback runs (to hand a staging buffer back). The first
    error of a write is raised by the next :meth:`write` or by :meth:`close`.

    Args:
        f: the open file, written only by the thread from now on.
        depth: the most writes queued at a time.
    """

    def __init__(self, f: BinaryIO, depth: int = 2) -> None:
        self.f = f
        self.nbytes = 0  # bytes queued so far
        self._depth = depth
        self._queue: deque[tuple[memoryview, Tensor | None, Callable[[], None] | None]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="convexmix-writer", daemon=True)
        self._thread.start()

    def write(self, data: Tensor, done: Callable[[], None] | None = None) -> None:
        """Queue the bytes of the contiguous CPU tensor ``data`` (waits while ``depth``
        writes are queued); ``done()`` runs once they are written (or dropped after an
        error)."""
        view = raw_bytes(data)
        with self._cond:
            while len(self._queue) >= self._depth and self._error is None:
                self._cond.wait()
            if self._error is not None:
                if done is not None:
                    done()
                raise self._error
            self._queue.append((view, data, done))
            self.nbytes += len(view)
            self._cond.notify_all()

    def close(self, *, check: bool = True) -> None:
        """Wait for the queued writes to finish; with ``check``, raise a failed one's
        error (without: when another error is already on its way)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if check and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                view, _, done = self._queue[0]
            try:
                if self._error is None:
                    self.f.write(view)
            except BaseException as err:  # handed to the merging thread, which raises it
                self._error = err
            finally:
                del view
                with self._cond:
                    self._queue.popleft()
                    self._cond.notify_all()
                if done is not None:
                    done()


Filler = Callable[[Entry, Sink], None]


def write_shard(path: Path, entries: Sequence[Entry], fill: Filler) -> None:
    """Write one safetensors file: the header, then each tensor's bytes from ``fill``
    (which must queue exactly ``entry.nbytes`` bytes on the :class:`Sink`), larger dtypes
    first so every tensor stays aligned to its element size."""
    layout = sorted(entries, key=lambda e: -torch.empty((), dtype=e.dtype).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in layout:
        header[e.name] = {
            "dtype": ST_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        sink = Sink(f)
        try:
            for e in layout:
                start = sink.nbytes
                fill(e, sink)
                if sink.nbytes - start != e.nbytes:  # pragma: no cover - a bug, not user input
                    raise ConvexMixError(
                        f"internal error: {e.name} wrote {sink.nbytes - start} bytes."
                    )
        except BaseException:
            sink.close(check=False)  # nothing more is written; the folder is removed
            raise
        sink.close()


def write_shards(
    folder: Path, entries: Sequence[Entry], shard_size: int, fill: Filler
) -> list[str]:
    """Write ``entries`` into ``folder`` as ``model.safetensors`` or as shards of at most
    ``shard_size`` bytes with an index; return the file names."""
    shards = plan_shards(entries, shard_size)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards, strict=True):
        write_shard(folder / name, shard, fill)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: n for n, s in zip(names, shards, strict=True) for e in s},
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def save_state_dict(state: Mapping[str, Tensor], folder: Path, shard_size: int) -> list[str]:
    """Write a state_dict as safetensors shards (shared tensors are written under each
    name: a reader gets every key)."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in state.items()}
    for n, t in tensors.items():
        if t.dtype not in ST_NAMES:
            raise ConvexMixError(f"tensor {n!r} has dtype {t.dtype}, which safetensors lacks.")
    entries = [Entry(n, Path(), t.dtype, tuple(t.shape)) for n, t in tensors.items()]

    def fill(e: Entry, sink: Sink) -> None:
        sink.write(tensors[e.name])

    return write_shards(folder, entries, shard_size, fill)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` to fill; rename it to ``out`` when
    the block succeeds, remove it when the block fails or is interrupted.

    ``out`` must not exist, or be an empty folder, or (``force=True``) a folder, which
    is then replaced. Nothing ever appears under ``out`` before the rename.
    """
    target = Path(out)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise ConvexMixError(f"{target} exists and is not a folder; choose another --out.")
        if any(target.iterdir()) and not force:
            raise ConvexMixError(
                f"{target} exists and is not empty; remove it or pass force=True (--force)."
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as err:
        raise ConvexMixError(f"cannot write {target}: {err.strerror or err}.") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConvexMixError(f"cannot write {target}: {err.strerror or err}.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_other_files(source: Path | None, folder: Path, dtype: torch.dtype | None) -> None:
    """Copy the non-weight files of a model folder (``config.json``, tokenizer files);
    with an output ``dtype``, ``config.json``'s ``torch_dtype`` says it."""
    if source is None:
        return
    for item in sorted(source.iterdir()):
        if not item.is_file() or item.name.startswith(".") or item.name == INDEX:
            continue
        if item.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(item, folder / item.name)
    config = folder / "config.json"
    if dtype is not None and config.is_file():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(config.read_text())
            if isinstance(data, dict):
                key = "dtype" if "dtype" in data and "torch_dtype" not in data else "torch_dtype"
                data[key] = str(dtype).removeprefix("torch.")
                config.write_text(json.dumps(data, indent=2) + "\n")
