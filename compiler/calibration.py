"""Calibration and sample inputs: .npz files, folders of them, tokenized text, or synthesized inputs.

`CalibrationData` holds one array per model input with the sample axis first and hands out batches of
feeds for ONNX Runtime. Symbolic dimensions are bound to small sizes when synthesizing.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from modelsurgeon.errors import UserError
from modelsurgeon.input_dims import KV_CACHE, fixed_dims

log = logging.getLogger("modelsurgeon")

# Sizes used for symbolic dimensions when inputs are synthesized (verification binds them small).
DEFAULT_BATCH = 2
DEFAULT_SEQ = 16


@dataclasses.dataclass
class CalibrationData:
    """One array per model input; axis 0 indexes samples. `batches()` yields ORT feed dicts."""

    arrays: dict[str, np.ndarray]
    source: str = "synthesized"
    # (file, {array name: samples}) of each file a folder's arrays were concatenated from, in order (error messages)
    files: list[tuple[str, dict[str, int]]] = dataclasses.field(default_factory=list)

    @property
    def num_samples(self) -> int:
        # 0-d arrays (a scalar model input) have no sample axis: every batch gets them whole
        sized = [len(a) for a in self.arrays.values() if np.ndim(a)]
        return min(sized) if sized else (1 if self.arrays else 0)

    def rows(self, rows: slice) -> dict[str, np.ndarray]:
        """Samples `rows` of every array (0-d arrays whole)."""
        return {k: v[rows] if np.ndim(v) else v for k, v in self.arrays.items()}

    def batches(self, batch_size: int = 8, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        for start in range(0, n, batch_size):
            yield self.rows(slice(start, min(start + batch_size, n)))

    def num_batches(self, batch_size: int = 8, limit: int | None = None) -> int:
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        return -(-n // batch_size)

    def head(self, n: int) -> dict[str, np.ndarray]:
        return self.rows(slice(None, n))

    def split(self, n_first: int) -> tuple["CalibrationData", "CalibrationData"]:
        return (CalibrationData(self.rows(slice(None, n_first)), self.source),
                CalibrationData(self.rows(slice(n_first, None)), self.source))


_DTYPES = {
    ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.BOOL: np.bool_,
    ir.DataType.UINT8: np.uint8, ir.DataType.INT8: np.int8, ir.DataType.INT16: np.int16, ir.DataType.UINT16: np.uint16,
    ir.DataType.UINT32: np.uint32, ir.DataType.UINT64: np.uint64,
}


def input_signature(model: ir.Model) -> list[tuple[str, np.dtype, tuple | None]]:
    """(name, numpy dtype, shape with str for symbolic dims) of each graph input that is not an initializer.

    The shape is None for an input declared without one (rank unknown), () for a scalar."""
    sig = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype
        if dtype not in _DTYPES:
            raise UserError(f"input '{value.name}' has type {dtype}; modelsurgeon feeds float, integer and bool inputs only")
        shape = None if value.shape is None else tuple(
            (d if isinstance(d, int) else (str(d) if d is not None and str(d) else "?")) for d in value.shape)
        sig.append((value.name, np.dtype(_DTYPES[dtype]), shape))
    return sig


def _vocab_size(model: ir.Model, input_name: str) -> int | None:
    """Rows of the embedding table an integer input indexes (through Gather), if found."""
    value = next((v for v in model.graph.inputs if v.name == input_name), None)
    if value is None:
        return None
    frontier, seen = [value], set()
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, idx in v.uses():
            if node.op_type == "Gather" and idx == 1 and node.inputs[0] is not None and node.inputs[0].const_value is not None:
                return int(node.inputs[0].const_value.shape[0])
            if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity") and idx == 0:
                frontier.extend(node.outputs)
    return None


def empty_past_dims(signature: list[tuple[str, np.dtype, tuple | None]]) -> set[str]:
    """Names of the cached-sequence axis of a decoder's KV-cache inputs (axis 2 of a rank-4 `past...` input).

    Made-up and text inputs bind them to 0: calibration and verification feed prompts with an empty cache, as a
    generation loop's first step does, and the mask then spans just the prompt."""
    return {shape[2] for name, _, shape in signature
            if KV_CACHE.search(name) and shape is not None and len(shape) == 4 and isinstance(shape[2], str)}


def _bind(shape: tuple, batch: int, seq: int, empty: set[str] = frozenset(),
          fixed: dict[int, int] | None = None) -> tuple[int, ...]:
    """Sizes for a declared shape: its fixed sizes, those `fixed` gives (`input_dims.fixed_dims`), 0 for an empty
    past, `batch` for axis 0 and `seq` for the rest."""
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif fixed and i in fixed:
            out.append(fixed[i])
        elif d in empty:
            out.append(0)
        else:
            out.append(batch if i == 0 else seq)
    return tuple(out)


def synthesize(model: ir.Model, num_samples: int = DEFAULT_BATCH, seq_len: int = DEFAULT_SEQ, seed: int = 0) -> CalibrationData:
    """Inputs made from the signature: normal floats, token ids within the vocabulary, all-ones masks."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    signature = input_signature(model)
    empty = empty_past_dims(signature)
    fixed = fixed_dims(model)
    for name, dtype, shape in signature:
        if shape is None:
            raise UserError(f"input '{name}' is declared without a shape, so inputs for it cannot be made up; give "
                            "real inputs with --calib (eval: --data), an .npz of input name -> array, samples first")
        shp = _bind(shape, num_samples, seq_len, empty, fixed.get(name))
        lname = name.lower()
        if np.issubdtype(dtype, np.floating):
            if "mask" in lname:
                arrays[name] = np.ones(shp, dtype)
            else:
                arrays[name] = rng.standard_normal(shp).astype(dtype)
        elif dtype == np.bool_:
            arrays[name] = np.ones(shp, dtype)
        elif "mask" in lname:
            arrays[name] = np.ones(shp, dtype)
        elif "position" in lname:
            arrays[name] = np.broadcast_to(np.arange(shp[-1], dtype=dtype), shp).copy()
        elif "type" in lname or "segment" in lname:
            arrays[name] = np.zeros(shp, dtype)
        else:
            high = _vocab_size(model, name) or 100
            arrays[name] = rng.integers(0, high, size=shp).astype(dtype)
    return CalibrationData(arrays, "synthesized")


def load_npz(path: str | pathlib.Path) -> CalibrationData:
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}); save inputs with numpy.savez") from None
    if not arrays:
        raise UserError(f"{path}: holds no arrays; save one array per model input, samples on axis 0")
    return CalibrationData(arrays, str(path))


def load_folder(path: str | pathlib.Path) -> CalibrationData:
    files = sorted(pathlib.Path(path).glob("*.npz"))
    if not files:
        raise UserError(f"{path}: folder holds no .npz files (or .txt files, for text calibration with --tokenizer)")
    parts = [load_npz(f).arrays for f in files]
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise UserError(f"{path}: .npz files hold different input names; give every file the same arrays")
    try:
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    except ValueError as exc:
        raise UserError(f"{path}: .npz files have inconsistent shapes ({exc})") from None
    return CalibrationData(arrays, str(path), [(str(f), {k: len(p[k]) if p[k].ndim else 1 for k in keys})
                                               for f, p in zip(files, parts)])


def load_tokenizer(path: str | pathlib.Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one."""
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise UserError(f"{path}: no tokenizer.json there; give a tokenizer.json file or a folder holding one")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("reading text needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:
        raise UserError(f"{file}: not a tokenizer.json ({exc})") from None


def tokenize_text(text: str, tokenizer, num_samples: int, seq_len: int, add_special_tokens: bool = False,
                  warn: bool = True) -> np.ndarray:
    """Consecutive, non-overlapping windows of `seq_len` tokens from the text: int64 (samples, seq_len)."""
    ids = []
    # Encode in chunks of lines: tokenizers is fast but very long strings cost memory.
    lines = text.splitlines(keepends=True)
    need = num_samples * seq_len
    for start in range(0, len(lines), 2000):
        ids.extend(tokenizer.encode("".join(lines[start:start + 2000]), add_special_tokens=add_special_tokens).ids)
        if len(ids) >= need:
            break
    usable = len(ids) // seq_len
    if usable == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; give more text or a smaller --seq-len")
    n = min(num_samples, usable)
    if n < num_samples and warn:
        log.warning("text gives only %d windows of %d tokens (asked for %d)", n, seq_len, num_samples)
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def tokenize_texts(texts: Sequence[str], tokenizer, num_samples: int, seq_len: int, skip: int = 0,
                   warn: bool = True) -> np.ndarray:
    """Windows spread evenly over several texts: the first ceil(num_samples / len(texts)) windows of each (after
    its first `skip`), then the first `num_samples` of those (texts too short for their share give what they have).

    A few windows from each of many texts calibrate better than many from one: on SmolLM2-135M, `slice` at 25%
    gives 1.45x the dense perplexity calibrated on 8 windows of each of 41 plays and poems, 1.68-1.76x on 64
    windows of one play (docs/slice.md, "Calibrate on many texts")."""
    if not texts:
        raise UserError("no calibration texts given")
    share = -(-num_samples // len(texts))
    parts = []
    for text in texts:
        try:
            parts.append(tokenize_text(text, tokenizer, skip + share, seq_len, warn=False)[skip:])
        except UserError:  # shorter than one window
            continue
    if not any(len(p) for p in parts):
        raise UserError(f"none of the {len(texts)} calibration texts holds a window of {seq_len} tokens; give longer "
                        "texts or a smaller --seq-len")
    ids = np.concatenate(parts)[:num_samples]
    if len(ids) < num_samples and warn:
        log.warning("%d texts give only %d windows of %d tokens (asked for %d)", len(texts), len(ids), seq_len,
                    num_samples)
    return ids


def from_token_ids(model: ir.Model, ids: np.ndarray, source: str = "text") -> CalibrationData:
    """Feeds for a language model's inputs from token windows: masks of ones, positions, zero token types, and an
    empty KV cache (see `empty_past_dims`)."""
    arrays: dict[str, np.ndarray] = {}
    signature = input_signature(model)
    empty = empty_past_dims(signature)
    fixed = fixed_dims(model)
    for name, dtype, shape in signature:
        lname = name.lower()
        if shape is not None and len(shape) == 4 and isinstance(shape[2], str) and shape[2] in empty:
            arrays[name] = np.zeros(_bind(shape, ids.shape[0], ids.shape[1], empty, fixed.get(name)), dtype)
        elif "mask" in lname:
            arrays[name] = np.ones(ids.shape, dtype)
        elif "position" in lname:
            arrays[name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(dtype)
        elif "type" in lname or "segment" in lname:
            arrays[name] = np.zeros(ids.shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            arrays[name] = ids.astype(dtype)
        else:
            raise UserError(f"text calibration cannot fill input '{name}' of type {dtype}; pass an .npz instead")
    return CalibrationData(arrays, source)


def load_calibration(model: ir.Model, calib: str | pathlib.Path | dict | CalibrationData | None = None, *,
                     tokenizer: str | pathlib.Path | None = None, num_samples: int = 32, seq_len: int = 128,
                     seed: int = 0, warn: bool = True) -> CalibrationData:
    """Resolve any accepted calibration source into CalibrationData; synthesize (with a warning) if none."""
    return _load(model, calib, tokenizer, num_samples, seq_len, seed, warn, extra=0)[0]


HOLDOUT_MAX = 8  # samples held back for verification at most (the verification run is one per pass)


def holdout_size(n: int) -> int:
    """How many of `n` calibration samples verification holds back by default: a quarter, at most `HOLDOUT_MAX`;
    none below 4 (too few to spare)."""
    return 0 if n < 4 else min(HOLDOUT_MAX, n // 4)


def load_with_holdout(model: ir.Model, calib: str | pathlib.Path | dict | CalibrationData, *,
                      holdout: int | None = None, tokenizer: str | pathlib.Path | None = None, num_samples: int = 32,
                      seq_len: int = 128, seed: int = 0, warn: bool = True
                      ) -> tuple[CalibrationData, CalibrationData | None, str]:
    """Calibration data for the passes and samples held back from them for verification, with a line saying where
    the held-back samples come from.

    `holdout` samples (default `holdout_size(num_samples)`; 0: none, the third item is then None) are taken from
    beyond the first `num_samples` when the source has more (the windows that follow in each text, the rows after
    `num_samples` of arrays), so the passes calibrate on what they would without verification; otherwise from the
    end of the calibration samples, which the passes then do without. At least one sample stays with the passes."""
    want = holdout_size(num_samples) if holdout is None else holdout
    data, extra = _load(model, calib, tokenizer, num_samples, seq_len, seed, warn, extra=want)
    if want <= 0:
        return data, None, ""
    if extra is not None and extra.num_samples:
        return data, extra, (f"{extra.num_samples} held-out sample(s) of {data.source} (those after the "
                             f"{data.num_samples} the passes calibrate on)")
    n = data.num_samples
    k = min(want if holdout is not None else holdout_size(n), n - 1)
    if k <= 0:
        if warn:
            log.warning("calibration (%s) has %d sample(s), too few to hold any back: verifying on the samples the "
                        "passes calibrate on (give 4 or more, or --eval data)", data.source, n)
        return data, None, ""
    rest, held = data.split(n - k)
    rest.files = held.files = data.files
    return rest, held, (f"{k} held-out sample(s) of {data.source} (its last {k}; the passes calibrate on the other "
                        f"{n - k})")


def _load(model: ir.Model, calib, tokenizer, num_samples: int, seq_len: int, seed: int, warn: bool,
          extra: int) -> tuple[CalibrationData, CalibrationData | None]:
    """The calibration data (see `load_calibration`), and up to `extra` samples of the source beyond its first
    `num_samples` (None for synthesized data)."""
    if isinstance(calib, CalibrationData):
        data = calib
    elif isinstance(calib, dict):
        data = CalibrationData({k: np.asarray(v) for k, v in calib.items()}, "arrays")
    elif calib is None:
        data = synthesize(model, num_samples=num_samples, seq_len=min(seq_len, 32), seed=seed)  # refusals come alone
        if warn:
            log.warning("no calibration data given: synthesizing random inputs from the input signature "
                        "(pass --calib for statistics that match real use)")
        return data, None
    else:
        path = pathlib.Path(calib)
        if not path.exists():
            raise UserError(f"{path}: calibration data not found")
        text_folder = path.is_dir() and not any(path.glob("*.npz")) and any(path.glob("*.txt"))
        if path.is_dir() and not text_folder:
            data = load_folder(path)
        elif path.suffix == ".npz":
            data = load_npz(path)
        else:  # text: one file, or a folder of .txt files
            if tokenizer is None:
                raise UserError(f"{path}: text calibration needs --tokenizer (a tokenizer.json or a folder holding one)")
            files = sorted(path.glob("*.txt")) if text_folder else [path]
            texts = []
            for file in files:
                try:
                    texts.append(file.read_text(encoding="utf-8", errors="replace"))
                except OSError as exc:
                    raise UserError(f"{file}: cannot read ({exc.strerror})") from None
            tok = load_tokenizer(tokenizer)
            if text_folder:
                source = f"{path} ({len(files)} texts)"
                ids = tokenize_texts(texts, tok, num_samples, seq_len)
                more = None
                if extra > 0:  # the windows after each text's share of the calibration windows
                    try:
                        more = tokenize_texts(texts, tok, extra, seq_len, skip=-(-num_samples // len(texts)),
                                              warn=False)
                    except UserError:  # no text has windows to spare
                        more = None
                return (from_token_ids(model, ids, source),
                        from_token_ids(model, more, source) if more is not None and len(more) else None)
            ids = tokenize_text(texts[0], tok, num_samples + extra, seq_len, warn=False)
            if len(ids) < num_samples and warn:
                log.warning("text gives only %d windows of %d tokens (asked for %d)", len(ids), seq_len, num_samples)
            return (from_token_ids(model, ids[:num_samples], str(path)),
                    from_token_ids(model, ids[num_samples:], str(path)) if len(ids) > num_samples else None)
    check_against(model, data)
    more = None
    if data.num_samples > num_samples:
        if extra > 0:
            more = CalibrationData(data.rows(slice(num_samples, num_samples + extra)), data.source)
        if warn and data.num_samples > num_samples + (more.num_samples if more is not None else 0):
            log.warning("calibration (%s): using the first %d of its %d samples (raise num_samples / --num-samples to "
                        "use more)", data.source, num_samples, data.num_samples)
        data = CalibrationData(data.head(num_samples), data.source, data.files)
    return data, more


def check_against(model: ir.Model, data: CalibrationData) -> None:
    """Every model input is present with a compatible rank, fixed dimensions and type, at least one sample, and
    finite values; arrays are converted to the model's types here (data.arrays is updated in place)."""
    for name, dtype, shape in input_signature(model):
        if name not in data.arrays:
            raise UserError(f"calibration data ({data.source}) lacks model input '{name}'; it has {', '.join(data.arrays)}")
        arr = data.arrays[name]
        if shape is not None and arr.ndim != len(shape):
            want = "a scalar (a 0-d array, given whole to every batch)" if shape == () else f"{len(shape)} {shape}"
            raise UserError(f"calibration input '{name}' has rank {arr.ndim}, the model wants {want}")
        if arr.ndim == 0 and shape is None:
            raise UserError(f"calibration input '{name}' is a single value; give samples along axis 0 (an array "
                            "of shape [samples, ...])")
        for i, (got, want) in enumerate(zip(arr.shape, shape or ())):
            if i > 0 and isinstance(want, int) and got != want:
                raise UserError(f"calibration input '{name}' has shape {arr.shape}, the model wants {shape}")
        if arr.ndim and len(arr) == 0:
            raise UserError(f"calibration input '{name}' holds no samples (shape {arr.shape}); give at least one "
                            "along axis 0")
        _require_finite_input(data, name, arr, "NaN or infinite values")
        if arr.dtype != dtype:
            arr = data.arrays[name] = _convert(name, arr, dtype)
            _require_finite_input(data, name, arr, f"values too large for {dtype}")


def _require_finite_input(data: CalibrationData, name: str, arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = ~np.isfinite(arr)
        where = _file_of(data, name, int(np.argmax(bad.reshape(len(arr), -1).any(axis=1))) if arr.ndim else 0)
        raise UserError(f"calibration input '{name}' in {where} holds {what} ({int(bad.sum())} of {arr.size}); give "
                        "finite inputs (statistics and verification cannot use them)")


def _convert(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`arr` as the model input's type, refusing conversions that would change the values (text, complex numbers,
    fractions or NaN to integers, integers out of the type's range)."""
    if arr.dtype.kind not in "biuf":
        raise UserError(f"calibration input '{name}' holds {arr.dtype} values, the model wants {dtype}; save numeric arrays")
    if dtype.kind in "iu" and arr.size:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise UserError(f"calibration input '{name}' holds non-integer values, the model wants {dtype}; save integers")
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise UserError(f"calibration input '{name}' holds values from {lo} to {hi}, outside the range of {dtype} "
                            "the model wants")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: refused by the caller
        return arr.astype(dtype)


def _file_of(data: CalibrationData, name: str, sample: int) -> str:
    """The file holding sample `sample` of input `name` (the source itself unless it is a folder of files)."""
    start = 0
    for file, counts in data.files:
        start += counts.get(name, 0)
        if sample < start:
            return file
    return data.source


def require_finite(stat: np.ndarray, value: str, who: str) -> np.ndarray:
    """`stat`, a statistic (Hessian, covariance, range, ...) a pass accumulated from activation `value` on the
    calibration data, if it is finite; else one line saying so (rather than a crash in numpy or scipy later).

    Calibration inputs are checked for NaN and Inf when loaded (`check_against`), so a non-finite statistic
    means the model itself produces NaN or Inf (or values too large to square in float32) on those inputs."""
    if not np.all(np.isfinite(stat)):
        raise UserError(f"{who}: activation '{value}' is NaN or infinite (or too large) on the calibration data, so "
                        "its statistics are too; check that the model runs correctly on its calibration inputs (--calib)")
    return stat
