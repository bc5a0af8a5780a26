"""Atomic writes: a reader (or a run killed half-way) never sees a half-written file or folder.

Every file and folder edkm writes goes through these two functions. A file is written to a
temporary name in the same folder, flushed and fsynced, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows). A folder is built under a temporary name by a
caller's function, its files fsynced, then renamed into place; an existing folder is swapped
out only once the new one is complete, and put back if the swap fails.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> write_text(root / "a.txt", "done\\n")
    >>> (root / "a.txt").read_text()
    'done\\n'
    >>> write_dir(root / "d", lambda tmp: (tmp / "f").write_text("x"))
    >>> sorted(p.name for p in (root / "d").iterdir())
    ['f']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["fsync_file", "write_dir", "write_json", "write_text"]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk (so a rename after it cannot expose an empty file).

    Example:
        >>> import tempfile; fsync_file(tempfile.mkstemp()[1])
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; write_text(p, "1"); p.read_text()
        '1'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"; write_json(p, {"a": 1})
        >>> json.loads(p.read_text())
        {'a': 1}
    """
    write_text(path, json.dumps(data, indent=indent) + "\n")


def write_dir(target: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Build a folder with ``write(tmp)`` and rename it to ``target`` once it is complete.

    The temporary folder sits next to ``target`` (same file system, so the rename is atomic).
    An existing ``target`` is moved aside, replaced, then deleted; if the replacement fails it
    is put back. Callers decide beforehand whether replacing ``target`` is allowed.

    Example:
        >>> import tempfile, pathlib
        >>> t = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> write_dir(t, lambda tmp: (tmp / "v").write_text("1"))
        >>> write_dir(t, lambda tmp: (tmp / "v").write_text("2"))
        >>> (t / "v").read_text()
        '2'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        if target.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
