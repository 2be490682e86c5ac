"""Writing output files all at once or not at all (private).

Every file convexmix writes (the CLI's ``--out`` JSON, plots) goes to a temporary file
beside its target, which is renamed over the target only once it is complete: an error
mid-write (a full disk, a file-size limit, an interrupt) leaves the previous file as it
was and no partial one. Failures are a :class:`ConvexMixError` that names the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from convexmix.errors import ConvexMixError

__all__: list[str] = []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it onto ``path`` when the
    block succeeds, remove it when the block fails.

    The temporary name keeps the suffix of ``path`` (so that writers that infer the format
    from it, like matplotlib, see the right one) and gets the permissions a new file would.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
        )
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())
    except OSError as err:
        raise ConvexMixError(f"cannot write {target}: {err.strerror or err}.") from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConvexMixError(f"cannot write {target}: {err.strerror or err}.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
