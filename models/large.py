"""Models over 2 GB for tests and benchmarks: a chain of large square MatMuls stored as external data.

`build(path, gigabytes)` writes the weights one matrix at a time (never the whole model in memory), each
at a 64 KiB-aligned offset as exporters do, so building a 6 GB model needs about one matrix of memory.
`run_measured(argv)` runs the modelsurgeon command line in a child process and returns its exit code,
wall time and peak resident memory, as the large-model test and `benchmarks/large.py` report them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ALIGN = 65536


def build(path: str | os.PathLike, gigabytes: float, dim: int = 16384, seed: int = 0) -> pathlib.Path:
    """Write `path` (and `<path>.data`) holding ceil(gigabytes / size of one matrix) fp32 dim x dim MatMuls.

    Input `x` [batch, dim] -> output `y` [batch, dim]; weights are scaled by 1/sqrt(dim), so activations
    keep their size through the chain."""
    import onnx
    from onnx import TensorProto, helper

    path = pathlib.Path(path)
    data_name = path.name + ".data"
    count = max(1, math.ceil(gigabytes * 2**30 / (dim * dim * 4)))
    rng = np.random.default_rng(seed)
    initializers, nodes = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for i in range(count):
            offset = -(-offset // ALIGN) * ALIGN
            data.seek(offset)
            for rows in range(0, dim, 2048):  # a slab at a time: memory stays at a fraction of one matrix
                slab = rng.standard_normal((min(2048, dim - rows), dim), dtype=np.float32)
                slab *= np.float32(1.0 / math.sqrt(dim))
                data.write(slab.tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(dim * dim * 4))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                          ["y" if i == count - 1 else f"h{i + 1}"], name=f"matmul{i}"))
            offset += dim * dim * 4
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="modelsurgeon.models.large")
    path.write_bytes(model.SerializeToString())
    return path


def data_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus its data file."""
    path = pathlib.Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


_CHILD = """
import json, resource, sys
from modelsurgeon.cli import main
code = main(sys.argv[2:])
peak = None
try:  # this process's own high-water mark; ru_maxrss also keeps the parent's peak across vfork+exec
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "peak_bytes": peak}, f)
sys.exit(code)
"""


def run_measured(argv: list[str], workdir: str | os.PathLike) -> dict:
    """Run `modelsurgeon ARGV` in a child process: {'code', 'seconds', 'peak_bytes', 'stderr'}.

    The peak is the child's own maximum resident set (Linux `VmHWM`), pages mapped from data files included. Not
    `ru_maxrss`: Python starts children with vfork, and exec carries the parent's high-water mark into the child's
    `ru_maxrss`, so a test runner that once held 4 GiB would see every child peak at 4 GiB."""
    stats = pathlib.Path(workdir) / f".measure-{os.getpid()}-{time.monotonic_ns()}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(stats), *map(str, argv)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    result = {"code": proc.returncode, "seconds": seconds, "peak_bytes": None, "stderr": proc.stderr.strip()}
    if stats.exists():
        result.update(json.loads(stats.read_text()))
        stats.unlink()
    return result
