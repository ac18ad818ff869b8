"""argparse types for numeric options: a value out of range is refused while parsing, as one line (exit 2).

    p.add_argument("--rounds", type=positive_int)    # 1, 2, ...
    p.add_argument("--warmup", type=nonnegative_int) # 0, 1, ...
    p.add_argument("--max-error", type=positive_float)  # finite and > 0 (NaN and inf are refused too)
    p.add_argument("--input-shape", type=input_shape, action="append")  # ("pixel_values", (1, 3, 224, 224))
"""

from __future__ import annotations

import argparse
import math


def _parse(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _parse(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """NAME=D0,D1,...: an input's name and its sizes (0 or more each; the name may hold '=', the sizes cannot)."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=SIZES; write e.g. pixel_values=1,3,224,224")
    sizes = []
    for part in dims.split(","):
        try:
            sizes.append(int(part.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}': '{part}' is not a size; write whole numbers, e.g. "
                                             f"{name}=1,3,224,224") from None
        if sizes[-1] < 0:
            raise argparse.ArgumentTypeError(f"'{text}': sizes must be 0 or more, not {part}")
    return name, tuple(sizes)
