"""Writing output files all at once or not at all (private): the one route for every file
convexmix writes (the CLI's ``--out`` files, plots).

* **Atomic.** The data goes to a temporary file in the target's own folder, which is
  flushed to disk and renamed over the target (``os.replace``) only once it is complete:
  an error mid-write (a full disk, a file-size limit, an interrupt) leaves the previous
  file as it was and no partial one.
* **Through symlinks.** A target that is a symbolic link is written through to the file
  it points to (the link stays a link, and its target is updated).
* **Regular files only.** A target that exists and is not a regular file (a folder, a
  FIFO, a device, a socket) is refused, never replaced.
* **Same mode.** A replaced file keeps its permission bits; a new file gets those the
  umask gives.
* **Never an input.** ``inputs`` names the files a command reads: a target that is one of
  them (the same file, through any path, link or hard link) is refused.

Failures are a :class:`ConvexMixError` that names the target.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from convexmix.errors import ConvexMixError

__all__: list[str] = []

PathLike = str | os.PathLike[str]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_id(path: PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_output(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """The file that writing ``path`` replaces (``path`` with its symlinks resolved), after
    checking that it may be replaced; a :class:`ConvexMixError` otherwise.

    Commands call it before any work, so that a bad output fails fast; :func:`atomic_path`
    calls it again just before it writes.

    Args:
        path: the output the user named.
        inputs: the files the command reads; ``path`` must be none of them.

    Returns:
        The resolved path (the file a symlink points to, or ``path``).

    Raises:
        ConvexMixError: ``path`` names a folder, a FIFO, a device or a socket, or one of
            the ``inputs``.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> check_output(folder / "new.json") == (folder / "new.json").resolve()
    True
    >>> try:
    ...     check_output(folder)
    ... except ConvexMixError as err:
    ...     print("refused:", "not a regular file" in str(err))
    refused: True
    """
    target = Path(os.path.realpath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as err:
        raise ConvexMixError(f"cannot write {path}: {err.strerror or err}.") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise ConvexMixError(
            f"cannot write {path}: it is {kind}, not a regular file; refusing to replace it."
        )
    for source in inputs:
        if _file_id(source) == (st.st_dev, st.st_ino):
            same = "" if str(source) == str(path) else f" ({source})"
            raise ConvexMixError(
                f"cannot write {path}: it is one of the command's input files{same}; "
                "choose another output."
            )
    return target


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside the target of ``path`` to write; rename it onto that
    target when the block succeeds, remove it when the block fails.

    The temporary name keeps the suffix of ``path`` (so that writers that infer the format
    from it, like matplotlib, see the right one). See the module's docstring for the
    rules (symlinks, non-regular files, modes, ``inputs``).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    inputs = list(inputs)
    target = check_output(path, inputs)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    except OSError as err:
        raise ConvexMixError(f"cannot write {path}: {err.strerror or err}.") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
        )
        os.close(fd)
    except OSError as err:
        raise ConvexMixError(f"cannot write {path}: {err.strerror or err}.") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # after writing: a read-only mode must not stop the writer
        _fsync(tmp)
        check_output(path, inputs)  # nothing changed it into a folder or an input meanwhile
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConvexMixError(f"cannot write {path}: {err.strerror or err}.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    with atomic_path(path, inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
