"""Where modelsurgeon may write: never over a file the input model reads, only regular files in writable folders.

A compile's input is its model file and every external-data file that model references. An output, its
data file (`<output>.data`) and a report are refused, before any work, when they resolve (through symbolic
links, hard links or `..`) to one of those files or to each other, when they exist but are not regular files
(a device such as /dev/null, a pipe, a folder), or when their folder does not take a new file (probed by
creating and removing one, since `os.access` says yes to root on read-only or virtual file systems).
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

from modelsurgeon.errors import UserError


def data_file_of(output: str | os.PathLike) -> pathlib.Path:
    """The external-data file saved beside `output` (its name plus `.data`)."""
    out = pathlib.Path(output)
    return out.with_name(out.name + ".data")


def input_files(model_path: str | os.PathLike) -> list[pathlib.Path]:
    """The model file and the external-data files it references (read without loading any tensor)."""
    path = pathlib.Path(model_path)
    if not path.is_file():
        return [path]
    stat = path.stat()
    return list(_input_files(path.resolve(), path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _input_files(resolved: pathlib.Path, path: pathlib.Path, mtime_ns: int, size: int) -> tuple[pathlib.Path, ...]:
    """input_files, parsed once per version of the file: the command line checks before loading and again when
    saving, and parsing a model that holds its weights inline reads all of them (0.7 s and 1.1 GB for SmolLM2)."""
    import onnx

    files = [path]
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: the loader says so later
        return tuple(files)
    graphs = [proto.graph]
    locations: set[str] = set()
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in tensor.external_data if e.key == "location")
        graphs.extend(a.g for n in graph.node for a in n.attribute if a.HasField("g"))
        graphs.extend(g for n in graph.node for a in n.attribute for g in a.graphs)
    files.extend(path.parent / loc for loc in sorted(locations))
    return tuple(files)


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _check_folder(target: pathlib.Path, what: str) -> None:
    parent = target.parent if str(target.parent) else pathlib.Path(".")
    blocking = next((a for a in [parent, *parent.parents] if a.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{target}: {blocking} is a file, not a folder; choose another {what} path")
    if not parent.exists():
        raise UserError(f"{target}: folder {parent} does not exist; create it first or choose another {what} path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".modelsurgeon-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{target}: cannot write in folder {parent} ({exc.strerror or exc}); choose another {what} path") from None


def protected_files(model_path: str | os.PathLike | None, reads: Iterable[str | os.PathLike] = ()) -> dict[pathlib.Path, str]:
    """{file: what it is} for the input model, its data files and other files the model in memory reads."""
    files = input_files(model_path) if model_path is not None else []
    named = {f: "the input model" if i == 0 else f"the input's data file {f.name}" for i, f in enumerate(files)}
    named.update({pathlib.Path(f): f"the input's data file {pathlib.Path(f).name}" for f in reads
                  if pathlib.Path(f) not in named})
    return named


def check_targets(targets: Sequence[tuple[str | os.PathLike, str]], protected: dict[pathlib.Path, str]) -> None:
    """Refuse any (path, what) target that would overwrite a protected file or another target, or cannot be written.

    `what` names the target in the message ("output", "output's data file", "report"); `protected` maps each
    file that must stay untouched to what it is (`protected_files`)."""
    seen: list[tuple[pathlib.Path, str]] = []
    for raw, what in targets:
        target = pathlib.Path(raw)
        if target.is_dir():
            raise UserError(f"{target}: is a folder; give a file name such as {target / 'model.onnx'}")
        if target.exists() and not target.is_file():
            raise UserError(f"{target}: is not a regular file (a device, pipe or socket); give a file path for the {what}")
        for src, role in protected.items():
            if src.exists() and target.exists() and _same_file(src, target) or target.resolve() == src.resolve():
                raise UserError(f"{target}: {what} path is {role}; choose another output path "
                                "(modelsurgeon never changes its input)")
        for other, other_what in seen:
            if target.resolve() == other.resolve() or target.exists() and other.exists() and _same_file(target, other):
                raise UserError(f"{target}: the {what} and the {other_what} are the same file; choose different paths")
        _check_folder(target, what)
        seen.append((target, what))
