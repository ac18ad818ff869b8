"""The on-disk cache of exported models and downloaded data: where it is, and producing an entry once.

`$MODELSURGEON_CACHE`, default ~/.cache/modelsurgeon. `produce_once(path, make)` calls `make(path)` only when
`path` is missing, holding an exclusive lock on `<path>.lock` so that parallel test runs (several engineers,
pytest-xdist) export a model once and the others wait and reuse it. `make` must write atomically
(`modelsurgeon.save` does), so a killed export never leaves a half-written entry.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Callable


def cache_dir(*parts: str) -> pathlib.Path:
    """`$MODELSURGEON_CACHE/<parts...>` (created)."""
    root = pathlib.Path(os.environ.get("MODELSURGEON_CACHE") or pathlib.Path.home() / ".cache" / "modelsurgeon")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
    """An exclusive advisory lock on `path` (a sibling .lock file is fine); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, atomic writes still keep entries whole
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def produce_once(path: pathlib.Path, make: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """Return `path`, calling `make(path)` first if it does not exist yet (once across processes)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        if not path.exists():  # another process may have made it while we waited
            make(path)
    if not path.exists():
        raise RuntimeError(f"{path} was not produced")
    return path
