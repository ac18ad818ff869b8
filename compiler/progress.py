"""Progress bars on long loops (calibration, per-layer work, sweeps): quiet when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator


def progress(iterable: Iterable, desc: str = "", total: int | None = None, enabled: bool = True) -> Iterator:
    if not enabled or not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
