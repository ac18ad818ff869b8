"""Latency and throughput of ONNX models on ONNX Runtime, measured interleaved so ratios hold on a noisy machine.

Every model gets its own session (thread spinning off, our custom-op library registered when built) and the
same inputs. After a warm-up, measurement runs in rounds: each round runs every model `number` times, in an
order rotated from round to round, so slow drifts of the machine (other jobs, frequency scaling, thermal
limits) hit all models alike. Latency is the median time of one `session.run` with its spread (25th-75th
percentile); the ratio against the first model is the median over rounds of the per-round ratio of mean run
times, which cancels drifts slower than a round. Throughput is items per second at the measured batch
(`batch / latency`), and tokens per second when the inputs have a sequence axis.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import platform
import time
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from modelsurgeon.errors import UserError

log = logging.getLogger("modelsurgeon")

DEFAULT_SEQ = 128
MIN_ROUND_SECONDS = 0.05  # with number=None each model runs about this long per round


def machine_info(providers: Sequence[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, Python and ONNX Runtime versions, providers, threads."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers": list(providers) if providers else ["CPUExecutionProvider"], "threads": threads or "default"}


def custom_ops_library() -> str | None:
    """Path of our custom-operator library when it is built (sessions register it), else None."""
    try:
        from modelsurgeon.runtime.custom_ops import library_path
    except ImportError:
        return None
    try:
        path = library_path()
    except Exception:  # a half-built library must not stop a benchmark; sessions fall back to ONNX functions
        return None
    return str(path) if path else None


def check_providers(providers: Sequence[str] | None) -> list[str]:
    import onnxruntime as ort

    if not providers:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    for p in providers:
        if p not in available:
            raise UserError(f"execution provider '{p}' is not available in this onnxruntime; available: {', '.join(available)}")
    return list(providers)


def file_size(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus the external data files it references."""
    path = pathlib.Path(path)
    total = path.stat().st_size
    if total > 64 * 2**20:  # weights stored inline (a file with external data is mostly graph): no need to parse it
        return total
    try:
        model = ir.load(path)
    except Exception:
        return total
    seen = set()
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor) and t.location not in seen:
            seen.add(t.location)
            data = pathlib.Path(t.base_dir) / t.location
            if data.exists():
                total += data.stat().st_size
    return total


RESULTS_BEGIN, RESULTS_END = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"


def write_results_section(page: str | os.PathLike, body: str, title: str = "Results",
                          begin: str = RESULTS_BEGIN, end: str = RESULTS_END) -> None:
    """Put `body` between the `begin` and `end` markers of a docs page (what lay between them goes).

    A page without the markers gets them appended under a `## {title}` heading; a missing page is created."""
    page = pathlib.Path(page)
    text = page.read_text() if page.exists() else ""
    if begin not in text or end not in text.split(begin, 1)[1]:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + f"## {title}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    page.write_text(f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")


def short_labels(models: Sequence[Any]) -> list[str]:
    """File names when they are unique, else the paths as given; `model<i>` for in-memory models."""
    names = [pathlib.Path(m).name if not isinstance(m, ir.Model) else f"model{i}" for i, m in enumerate(models)]
    if len(set(names)) == len(names):
        return names
    return [str(m) if not isinstance(m, ir.Model) else f"model{i}" for i, m in enumerate(models)]


def _repeat_to(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first `n` samples, repeating the data cyclically when it holds fewer."""
    out = {}
    for k, a in arrays.items():
        out[k] = a[np.arange(n) % len(a)] if np.ndim(a) else a  # 0-d: a scalar input, given whole
    return out


def bench_feeds(model: ir.Model, batch: int = 1, seq: int | None = None, calibration: Any = None,
                tokenizer: str | None = None) -> dict[str, np.ndarray]:
    """Inputs for a benchmark: `batch` samples of the calibration data, or synthesized from the input signature
    with symbolic dimensions after the first bound to `seq` (default 128)."""
    from modelsurgeon import calibration as calib_mod

    if batch < 1:
        raise UserError("--batch must be at least 1")
    if seq is not None and seq < 1:
        raise UserError("--seq must be at least 1")
    if calibration is not None:
        data = calib_mod.load_calibration(model, calibration, tokenizer=tokenizer, num_samples=batch,
                                          seq_len=seq or DEFAULT_SEQ, warn=False)
        feeds = _repeat_to(data.arrays, batch)
        if seq is not None:
            for name, _, shape in calib_mod.input_signature(model):
                if shape and len(shape) > 1 and not isinstance(shape[1], int) and name in feeds and feeds[name].shape[1] != seq:
                    log.warning("--seq %d ignored for input '%s': the calibration data has length %d",
                                seq, name, feeds[name].shape[1])
        return feeds
    return calib_mod.synthesize(model, num_samples=batch, seq_len=seq or DEFAULT_SEQ, seed=0).arrays


@dataclasses.dataclass
class BenchRow:
    """One model's measurement. Times are in milliseconds."""

    model: str
    bytes: int | None
    batch: int
    tokens: int | None  # tokens per run when the inputs have a sequence axis
    runs: int
    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    spread: float  # (q75 - q25) / median
    items_per_s: float
    tokens_per_s: float | None
    latency_ratio: float  # median over rounds of (this model's mean / the first model's mean); < 1 is faster
    speedup: float  # 1 / latency_ratio
    size_ratio: float | None
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchReport:
    rows: list[BenchRow]
    settings: dict[str, Any]
    machine: dict[str, Any]

    def table(self) -> str:
        from modelsurgeon.stats import human_bytes

        head = ["model", "size", "latency (median)", "IQR", "spread", "throughput", "latency vs first", "speedup"]
        lines = [head]
        for r in self.rows:
            thr = f"{r.items_per_s:,.1f}/s" + (f" ({r.tokens_per_s:,.0f} tok/s)" if r.tokens_per_s else "")
            lines.append([r.model, human_bytes(r.bytes) + (f" ({r.size_ratio:.0%})" if r.size_ratio is not None and r is not self.rows[0] else ""),
                          f"{r.median_ms:.3f} ms", f"{r.q25_ms:.3f}-{r.q75_ms:.3f}", f"{r.spread:.1%}", thr,
                          f"{r.latency_ratio:.3f}x", f"{r.speedup:.2f}x"])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        out = []
        for j, row in enumerate(lines):
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        s = self.settings
        out.append("")
        out.append(f"batch {s['batch']}" + (f", seq {s['seq']}" if s.get("seq") else "") + f"; {s['rounds']} interleaved rounds, "
                   f"warm-up {s['warmup']}; threads {self.machine['threads']}; {', '.join(self.machine['providers'])}; "
                   f"custom ops: {s['custom_ops'] or 'not built'}")
        return "\n".join(out)

    def as_dict(self, command: str | None = None) -> dict[str, Any]:
        """In the results convention of docs/results.md: benchmark, command, machine, rows, notes."""
        return {"benchmark": "bench", "command": command, "machine": self.machine, "settings": self.settings,
                "rows": [r.as_dict() for r in self.rows], "notes": [
                    "latency: median of single session.run calls; latency_ratio: median over interleaved rounds of "
                    "the per-round ratio to the first model"]}


def _tokens(feeds: dict[str, np.ndarray], model: ir.Model) -> int | None:
    """batch * sequence length when an integer input of rank 2 has a symbolic second axis (token ids)."""
    from modelsurgeon.calibration import input_signature

    for name, dtype, shape in input_signature(model):
        if np.issubdtype(dtype, np.integer) and shape and len(shape) == 2 and not isinstance(shape[1], int) and name in feeds:
            return int(feeds[name].shape[0] * feeds[name].shape[1])
    return None


def _session_feeds(session, feeds: dict[str, np.ndarray], label: str, first_label: str) -> dict[str, np.ndarray]:
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    out = {}
    for inp in session.get_inputs():
        if inp.name not in feeds:
            raise UserError(f"{label} needs input '{inp.name}', which {first_label} does not have; "
                            "benchmark models with the same inputs")
        a = feeds[inp.name]
        want = types.get(inp.type)
        out[inp.name] = a.astype(want) if want is not None and a.dtype != want else a
    return out


def benchmark(models: Sequence[str | os.PathLike | ir.Model], *, labels: Sequence[str] | None = None,
              feeds: dict[str, np.ndarray] | None = None, batch: int = 1, seq: int | None = None,
              calibration: Any = None, tokenizer: str | None = None, providers: Sequence[str] | None = None,
              threads: int | None = None, warmup: int = 5, rounds: int = 10, number: int | None = None,
              accuracy_level: int | None = None, progress: bool = False) -> BenchReport:
    """Measure every model on the same inputs, interleaved; ratios are against the first model.

    `feeds` overrides the inputs; otherwise they come from `calibration` (first `batch` samples) or are
    synthesized (`batch`, `seq`). `number` is the runs per model per round (default: enough for ~50 ms).
    """
    from modelsurgeon.model_io import load
    from modelsurgeon.progress import progress as progress_bar
    from modelsurgeon.runtime.session import make_session

    if not models:
        raise UserError("give at least one model to benchmark")
    if rounds < 1 or warmup < 0 or (number is not None and number < 1):
        raise UserError("--rounds and --number must be at least 1 and --warmup at least 0")
    if threads is not None and threads < 1:
        raise UserError("--threads must be at least 1")
    providers = check_providers(providers)
    labels = list(labels) if labels else short_labels(models)
    first = models[0] if isinstance(models[0], ir.Model) else load(models[0])
    if feeds is None:
        feeds = bench_feeds(first, batch, seq, calibration, tokenizer)
    batch_eff = int(next(iter(feeds.values())).shape[0]) if feeds and next(iter(feeds.values())).ndim else 1
    tokens = _tokens(feeds, first)

    sessions, run_feeds = [], []
    for model, label in zip(models, labels):
        try:
            sess = make_session(model, providers=providers, threads=threads, accuracy_level=accuracy_level)
        except Exception as exc:
            raise UserError(f"{label}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
        f = _session_feeds(sess, feeds, label, labels[0])
        try:
            sess.run(None, f)
        except Exception as exc:
            raise UserError(f"{label}: ONNX Runtime cannot run it on inputs "
                            f"{ {k: tuple(v.shape) for k, v in f.items()} } ({str(exc).strip().splitlines()[0][:160]}); "
                            "choose --batch/--seq or --calib data that fit the model") from None
        sessions.append(sess)
        run_feeds.append(f)

    numbers = []
    for sess, f in zip(sessions, run_feeds):
        times = []
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            sess.run(None, f)
            times.append(time.perf_counter() - t0)
        numbers.append(number or max(1, math.ceil(MIN_ROUND_SECONDS / max(float(np.median(times)), 1e-6))))

    n = len(sessions)
    samples: list[list[float]] = [[] for _ in range(n)]
    round_means = np.zeros((rounds, n))
    for r in progress_bar(range(rounds), desc="benchmark", total=rounds, enabled=progress):
        for k in range(n):
            i = (k + r) % n  # rotate the order every round
            sess, f = sessions[i], run_feeds[i]
            t_round = 0.0
            for _ in range(numbers[i]):
                t0 = time.perf_counter()
                sess.run(None, f)
                dt = time.perf_counter() - t0
                samples[i].append(dt)
                t_round += dt
            round_means[r, i] = t_round / numbers[i]

    sizes = [None if isinstance(m, ir.Model) else file_size(m) for m in models]
    rows = []
    for i in range(n):
        t = np.asarray(samples[i]) * 1e3
        med = float(np.median(t))
        q25, q75 = (float(x) for x in np.percentile(t, [25, 75]))
        ratio = float(np.median(round_means[:, i] / round_means[:, 0]))
        rows.append(BenchRow(
            model=labels[i], bytes=sizes[i], batch=batch_eff, tokens=tokens, runs=len(t), median_ms=med,
            q25_ms=q25, q75_ms=q75, min_ms=float(t.min()), spread=(q75 - q25) / med if med > 0 else 0.0,
            items_per_s=batch_eff / (med / 1e3), tokens_per_s=tokens / (med / 1e3) if tokens else None,
            latency_ratio=ratio, speedup=1.0 / ratio if ratio > 0 else float("inf"),
            size_ratio=sizes[i] / sizes[0] if sizes[i] and sizes[0] else None,
            path=None if isinstance(models[i], ir.Model) else str(models[i])))
    seq_eff = tokens // batch_eff if tokens else None
    settings = {"batch": batch_eff, "seq": seq_eff, "rounds": rounds, "warmup": warmup, "number": numbers,
                "accuracy_level": accuracy_level, "custom_ops": custom_ops_library(),
                "inputs": {k: list(v.shape) for k, v in feeds.items()}}
    return BenchReport(rows, settings, machine_info(providers, threads))
