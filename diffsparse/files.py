"""Writing files whole or not at all."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _new_file_beside(path: Path) -> Path:
    """Create an empty file with a fresh name beside `path` and return its path.

    Unlike `tempfile.mkstemp` (always mode 0600), the file is created with mode 0666 less the process umask, as
    `open(path, "w")` would create `path` itself, so the file that replaces `path` has the usual permissions.
    """
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{path.suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"Could not find a free temporary name beside {path}.")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that go by it still work), moved onto `path` when
    the block ends; on an error it is deleted and `path` is left as it was. The file gets the usual mode of a new
    file (0666 less the umask).

    Example:
        >>> with atomic_path("out/results.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        yield tmp
        # writers that replace the file they are given (safetensors' save_file) leave mode 0600: restore the usual
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> None:
    """`data` as JSON at `path`, whole or not at all (values JSON cannot hold are written as strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, default=str))
