"""Quality of a compressed model on data, against the original: the numbers that decide whether it is usable.

Tasks (each also reports the raw output error against the reference: relative L2, max abs, cosine per output,
accumulated over all batches, worst output first in `metrics`):

- `lm`: perplexity on consecutive windows of tokenized text (next-token negative log-likelihood over every
  position but the last of each window), for both models; next-token top-1 agreement, top-1 accuracy against
  the text, and the mean KL divergence KL(reference || model) of the next-token distributions.
- `embedding`: sentence embeddings (a rank-2 output as is; a rank-3 output mean-pooled over the attention
  mask, as sentence-transformers does); cosine between the model's and the reference's embedding of each
  sentence; and whether the similarity structure survives: Spearman correlation of all pairwise cosine
  similarities, nearest-neighbour agreement and top-5 neighbour overlap.
- `classification`: top-1 agreement with the reference, and top-1 accuracy of both when labels are given.
- `output`: only the raw output error (any model; inputs from data or synthesized).
- `generate` (KV-cache decoders, `runtime/generate.py`): from the first half of each text window, `gen_tokens`
  greedy tokens by a generation loop (prefill, then one token per step with the cache), model and reference each
  continuing its own text: token agreement (share of positions where the two generated the same token) and the
  tokens generated before the first difference; and perplexity of the whole windows through that cached path
  (first half in one step, the rest one token per step), of both, their ratio and next-token top-1 agreement.

Models run in ONNX Runtime through `make_session` (spinning off, custom ops registered); memory stays bounded
by one batch (LM log-probabilities are computed in row chunks).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from modelsurgeon import calibration as calib_mod
from modelsurgeon.errors import UserError

log = logging.getLogger("modelsurgeon")

TASKS = ("lm", "embedding", "classification", "output", "generate")
# (headline metric, higher is better) per task; sweeps plot the headline.
HEADLINE = {"lm": ("perplexity", False), "embedding": ("cosine_mean", True), "classification": ("top1_agreement", True),
            "output": ("rel_l2", False), "generate": ("token_agreement", True)}
_LOGPROB_ROWS = 512  # rows of [tokens, vocab] turned into log-probabilities at a time
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


@dataclasses.dataclass
class EvalResult:
    task: str
    model: str
    reference: str | None
    data: str
    samples: int
    metrics: dict[str, float | None]
    outputs: dict[str, dict[str, float]]  # raw error per output against the reference
    headline: str
    higher_is_better: bool

    @property
    def quality(self) -> float | None:
        return self.metrics.get(self.headline)

    def as_dict(self, command: str | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["command"] = command
        return d

    def table(self) -> str:
        lines = [f"task {self.task}: {self.model}" + (f" vs reference {self.reference}" if self.reference else "")
                 + f" on {self.samples} samples of {self.data}"]
        width = max(len(k) for k in self.metrics) if self.metrics else 0
        for k, v in self.metrics.items():
            mark = "  <- " + ("higher" if self.higher_is_better else "lower") + " is better" if k == self.headline else ""
            lines.append(f"  {k.ljust(width)}  {_fmt(v)}{mark}")
        if len(self.outputs) > 1:
            lines.append("  per output (max abs / rel L2 / cosine):")
            for name, e in self.outputs.items():
                lines.append(f"    {name}: {e['max_abs']:.3e} / {e['rel_l2']:.3e} / {e['cosine']:.6f}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    v = float(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.6g}"
    return f"{v:.4e}"


class _ErrorSum:
    """Relative L2, max abs and cosine of one output, accumulated over batches (float64 sums)."""

    def __init__(self) -> None:
        self.d2 = self.r2 = self.g2 = self.dot = self.max_abs = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r = np.asarray(ref, np.float64).ravel()
        g = np.asarray(got, np.float64).ravel()
        if r.size == 0:
            return
        d = g - r
        self.d2 += float(d @ d)
        self.r2 += float(r @ r)
        self.g2 += float(g @ g)
        self.dot += float(r @ g)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    def result(self) -> dict[str, float]:
        rel = float(np.sqrt(self.d2 / self.r2)) if self.r2 > 0 else float(np.sqrt(self.d2))
        if self.r2 > 0 and self.g2 > 0:
            cos = self.dot / float(np.sqrt(self.r2 * self.g2))
        else:
            cos = 1.0 if self.r2 == self.g2 else 0.0
        return {"max_abs": self.max_abs, "rel_l2": rel, "cosine": float(cos)}


class _Runner:
    """A session with feeds filtered and cast to its inputs, and outputs by name."""

    def __init__(self, model: Any, label: str, providers, threads, accuracy_level):
        from modelsurgeon.runtime.session import make_session

        self.label = label
        try:
            self.session = make_session(model, providers=providers, threads=threads, accuracy_level=accuracy_level)
        except Exception as exc:
            raise UserError(f"{label}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
        self.inputs = {i.name: _NP_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [k for k in self.inputs if k not in feeds]
        if missing:
            raise UserError(f"{self.label} needs input '{missing[0]}', which the data does not provide; "
                            f"the data has {', '.join(feeds)}")
        f = {k: (feeds[k].astype(t) if t is not None and feeds[k].dtype != t else feeds[k]) for k, t in self.inputs.items()}
        try:
            return dict(zip(self.output_names, self.session.run(self.output_names, f)))
        except Exception as exc:
            raise UserError(f"{self.label}: ONNX Runtime failed on inputs {({k: tuple(v.shape) for k, v in f.items()})} "
                            f"({str(exc).strip().splitlines()[0][:160]})") from None


# ------------------------------------------------------------------------------------------------- data

def ids_input(model: ir.Model) -> str:
    """The token-id input of a language or embedding model: an integer input that is no mask, position or type."""
    for name, dtype, _ in calib_mod.input_signature(model):
        lname = name.lower()
        if np.issubdtype(dtype, np.integer) and not any(w in lname for w in ("mask", "position", "type", "segment")):
            return name
    raise UserError("the model has no integer token-id input; the lm and embedding tasks need one "
                    "(use --task output or classification)")


def _check_vocab(model: ir.Model, name: str, ids: np.ndarray) -> None:
    vocab = calib_mod._vocab_size(model, name)
    if vocab is not None and ids.size and int(ids.max()) >= vocab:
        raise UserError(f"the data has token id {int(ids.max())} but the model's embedding has {vocab} rows; "
                        "use the tokenizer the model was trained with")


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _data_path(data: Any) -> pathlib.Path | None:
    if data is None or isinstance(data, (dict, calib_mod.CalibrationData)):
        return None
    path = pathlib.Path(data)
    if not path.exists():
        raise UserError(f"{path}: data not found")
    return path


def _is_text(path: pathlib.Path | None) -> bool:
    return path is not None and path.is_file() and path.suffix != ".npz"


def lm_data(model: ir.Model, data: Any, tokenizer: Any, num_samples: int, seq_len: int) -> calib_mod.CalibrationData:
    """Token windows [samples, seq_len] for perplexity: text + tokenizer, or .npz / folder holding the ids."""
    path = _data_path(data)
    if data is None:
        raise UserError("the lm task needs --data: a text file (with --tokenizer) or an .npz of token ids")
    if _is_text(path):
        if tokenizer is None:
            raise UserError(f"{path}: text data needs --tokenizer (a tokenizer.json or a folder holding one)")
        ids = calib_mod.tokenize_text(_read_text(path), calib_mod.load_tokenizer(tokenizer), num_samples, seq_len)
        result = calib_mod.from_token_ids(model, ids, str(path))
    else:
        result = calib_mod.load_calibration(model, data, num_samples=num_samples, warn=False)
    name = ids_input(model)
    ids = result.arrays[name]
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise UserError(f"token ids '{name}' must be [samples, tokens] with at least 2 tokens; got shape {ids.shape}")
    _check_vocab(model, name, ids)
    return result


def _pad_id(tok) -> int:
    pad = getattr(tok, "padding", None)
    if pad and pad.get("pad_id") is not None:
        return int(pad["pad_id"])
    for t in ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"):
        i = tok.token_to_id(t)
        if i is not None:
            return int(i)
    return 0


def read_sentences(path: pathlib.Path, num_samples: int) -> list[str]:
    lines = [l.strip() for l in _read_text(path).splitlines()]
    return [l for l in lines if l][:num_samples]


def sentence_batches(model: ir.Model, sentences: Sequence[str], tokenizer: Any, seq_len: int,
                     batch_size: int) -> list[dict[str, np.ndarray]]:
    """Feeds for sentences: special tokens added, truncated to `seq_len`, each batch padded to its longest."""
    tok = calib_mod.load_tokenizer(tokenizer)
    tok.no_padding()
    tok.enable_truncation(max_length=seq_len)
    encodings = tok.encode_batch(list(sentences), add_special_tokens=True)
    pad = _pad_id(tok)
    id_name = ids_input(model)
    batches = []
    for start in range(0, len(encodings), batch_size):
        chunk = encodings[start:start + batch_size]
        width = max(len(e.ids) for e in chunk)
        ids = np.full((len(chunk), width), pad, np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for i, e in enumerate(chunk):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        feeds = {}
        for name, dtype, _ in calib_mod.input_signature(model):
            lname = name.lower()
            if name == id_name:
                feeds[name] = ids.astype(dtype)
            elif "mask" in lname:
                feeds[name] = mask.astype(dtype)
            elif "position" in lname:
                feeds[name] = np.broadcast_to(np.arange(width), ids.shape).astype(dtype)
            elif "type" in lname or "segment" in lname:
                feeds[name] = np.zeros(ids.shape, dtype)
            else:
                raise UserError(f"text data cannot fill input '{name}'; pass an .npz with every input instead")
        _check_vocab(model, id_name, ids)
        batches.append(feeds)
    return batches


def _load_labels(labels: Any, n: int) -> np.ndarray:
    if labels is None or isinstance(labels, np.ndarray):
        arr = labels
    else:
        path = pathlib.Path(labels)
        if not path.exists():
            raise UserError(f"{path}: labels not found")
        try:
            arr = np.load(path) if path.suffix == ".npy" else np.array([int(x) for x in _read_text(path).split()])
        except ValueError:
            raise UserError(f"{path}: labels must be integers (a .npy array or one integer per line)") from None
    arr = np.asarray(arr)
    if arr.shape[0] < n:
        raise UserError(f"{len(arr)} labels for {n} samples; give one label per sample")
    return arr[:n]


# ------------------------------------------------------------------------------------------------- metrics

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of each next token, and how many: logits [batch, seq, vocab] scored against
    ids [batch, seq] shifted by one (every position but the first of each window is a target). Perplexity over
    several calls is exp(sum of nll / sum of counts)."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = np.asarray(ids)[:, 1:].reshape(-1)
    nll = 0.0
    for s in range(0, len(target), _LOGPROB_ROWS):
        lp = _log_softmax(z[s:s + _LOGPROB_ROWS])
        nll -= float(lp[np.arange(len(lp)), target[s:s + _LOGPROB_ROWS]].sum())
    return nll, int(target.size)


def _pick_output(outputs: dict[str, np.ndarray], preferred: Sequence[str], want: str | None, task: str) -> str:
    if want is not None:
        if want not in outputs:
            raise UserError(f"--output-name {want}: the model has no such output; it has {', '.join(outputs)}")
        return want
    for name in preferred:
        if name in outputs:
            return name
    for name, a in outputs.items():
        if np.issubdtype(a.dtype, np.floating):
            return name
    raise UserError(f"the {task} task found no floating-point output; the model outputs {', '.join(outputs)}")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(np.sqrt((ra @ ra) * (rb @ rb)))
    return float(ra @ rb / den) if den > 0 else 1.0


def embedding_metrics(emb: np.ndarray, ref: np.ndarray, k: int = 5) -> dict[str, float]:
    """Cosine per sentence and agreement of the similarity structure (needs at least 3 sentences)."""
    def normed(x):
        x = x.astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    e, r = normed(emb), normed(ref)
    cos = np.sum(e * r, axis=1)
    n = len(e)
    s_e, s_r = e @ e.T, r @ r.T
    iu = np.triu_indices(n, 1)
    np.fill_diagonal(s_e, -np.inf)
    np.fill_diagonal(s_r, -np.inf)
    kk = min(k, n - 1)
    top_e = np.argsort(-s_e, axis=1, kind="stable")[:, :kk]
    top_r = np.argsort(-s_r, axis=1, kind="stable")[:, :kk]
    overlap = np.mean([len(set(a) & set(b)) / kk for a, b in zip(top_e, top_r)])
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "similarity_spearman": spearman(s_e[iu], s_r[iu]),
            "nearest_neighbour_agreement": float(np.mean(top_e[:, 0] == top_r[:, 0])),
            f"top{kk}_neighbour_overlap": float(overlap)}


def _pool(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if x.ndim == 2:
        return x
    if x.ndim != 3:
        raise UserError(f"an embedding output must be [batch, dim] or [batch, tokens, dim]; got shape {x.shape}")
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(axis=1)
    m = mask.astype(np.float64)[..., None]
    return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def _mask_of(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    return next((v for k, v in feeds.items() if "mask" in k.lower() and v.ndim == 2), None)


# ------------------------------------------------------------------------------------------------- evaluate

def check_request(task: str, data: Any, tokenizer: Any, has_reference: bool, num_samples: int = 1, seq_len: int = 1,
                  batch_size: int = 1) -> None:
    """Refuse an evaluation that cannot run, before any model is loaded (sweeps call it before compiling)."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if num_samples < 1 or seq_len < 1 or batch_size < 1:
        raise UserError("--num-samples, --seq-len and --batch-size must be at least 1")
    if not has_reference and task in ("embedding", "output"):
        raise UserError(f"the {task} task compares with the original: pass --reference ORIGINAL.onnx")
    if data is None and task != "output":
        raise UserError({"lm": "the lm task needs --data: a text file (with --tokenizer) or an .npz of token ids",
                         "generate": "the generate task needs --data: a text file (with --tokenizer) or an .npz of "
                                     "token ids (prompts are the first half of each window)",
                         "embedding": "the embedding task needs --data: a text file of sentences (with --tokenizer) "
                                      "or an .npz of inputs",
                         "classification": "the classification task needs --data: an .npz of inputs (with a 'labels' "
                                           "array, or --labels)"}[task])
    path = _data_path(data)
    if _is_text(path) and tokenizer is None:
        raise UserError(f"{path}: text data needs --tokenizer (a tokenizer.json or a folder holding one)"
                        if task != "classification" else f"{path}: the classification task takes an .npz of model inputs")


def evaluate(model: Any, reference: Any = None, *, task: str = "output", data: Any = None, tokenizer: Any = None,
             labels: Any = None, num_samples: int = 64, seq_len: int = 128, batch_size: int = 8,
             output: str | None = None, providers: Sequence[str] | None = None, threads: int | None = None,
             accuracy_level: int | None = None, progress: bool = False, model_label: str | None = None,
             reference_label: str | None = None, gen_tokens: int = 32) -> EvalResult:
    """Evaluate `model` (path or IR model) on `data`, against `reference` when given. See the module docstring."""
    from modelsurgeon.capture import batch_size_for
    from modelsurgeon.model_io import as_model
    from modelsurgeon.progress import progress as progress_bar
    from modelsurgeon.runtime.benchmark import check_providers

    check_request(task, data, tokenizer, reference is not None, num_samples, seq_len, batch_size)
    providers = check_providers(providers)
    label = model_label or (str(model) if not isinstance(model, ir.Model) else "model")
    ref_label = reference_label or (None if reference is None else str(reference) if not isinstance(reference, ir.Model) else "reference")
    if task == "generate":
        return _evaluate_generate(model, reference, data=data, tokenizer=tokenizer, num_samples=num_samples,
                                  seq_len=seq_len, batch_size=batch_size, gen_tokens=gen_tokens,
                                  session_kwargs=dict(providers=providers, threads=threads, accuracy_level=accuracy_level),
                                  progress=progress, label=label, ref_label=ref_label)
    ir_model = as_model(model)
    bs = batch_size_for(ir_model, batch_size)
    path = _data_path(data)

    # ---- batches of feeds (and per-task side data)
    label_arr = None
    if task == "lm":
        calib = lm_data(ir_model, data, tokenizer, num_samples, seq_len)
        batches = list(calib.batches(bs))
        source = calib.source
    elif task == "embedding" and _is_text(path):
        sentences = read_sentences(path, num_samples)
        if len(sentences) < 3:
            raise UserError(f"{path}: has {len(sentences)} non-empty lines; the embedding task needs at least 3 sentences")
        batches = sentence_batches(ir_model, sentences, tokenizer, seq_len, bs)
        source = str(path)
    else:
        calib = calib_mod.load_calibration(ir_model, data, tokenizer=tokenizer, num_samples=num_samples, seq_len=seq_len,
                                           warn=True)
        source = calib.source
        if task == "classification":
            inputs = {n for n, _, _ in calib_mod.input_signature(ir_model)}
            key = next((k for k in ("labels", "label", "y", "targets") if k in calib.arrays and k not in inputs), None)
            if labels is not None:
                label_arr = _load_labels(labels, calib.num_samples)
            elif key is not None:
                label_arr = _load_labels(calib.arrays[key], calib.num_samples)
            if reference is None and label_arr is None:
                raise UserError("classification without --reference needs labels: a 'labels' array in the .npz or --labels")
        batches = list(calib.batches(bs))
        if task == "embedding" and sum(len(next(iter(b.values()))) for b in batches) < 3:
            raise UserError("the embedding task needs at least 3 samples")
    del ir_model

    runner = _Runner(model, label, providers, threads, accuracy_level)
    ref_runner = _Runner(reference, ref_label, providers, threads, accuracy_level) if reference is not None else None

    errors: dict[str, _ErrorSum] = {}
    nll = [0.0, 0.0]  # model, reference
    tokens = 0
    agree = correct = correct_ref = kl = 0.0
    items = 0
    embs: list[np.ndarray] = []
    ref_embs: list[np.ndarray] = []
    chosen = None
    seen = 0
    for feeds in progress_bar(batches, desc=f"eval {task}", total=len(batches), enabled=progress):
        out = runner.run(feeds)
        ref_out = ref_runner.run(feeds) if ref_runner else None
        n_batch = len(next(iter(feeds.values())))
        if ref_out is not None:
            for name, r in ref_out.items():
                if name not in out:
                    continue
                if out[name].shape != r.shape:
                    raise UserError(f"output '{name}' has shape {out[name].shape} but the reference's is {r.shape}; "
                                    "compare models with the same outputs")
                errors.setdefault(name, _ErrorSum()).add(r, out[name])
            if not errors:
                raise UserError(f"the model and the reference share no output name (model: {', '.join(out)}; "
                                f"reference: {', '.join(ref_out)})")
        if task == "lm":
            chosen = chosen or _pick_output(out, ("logits",), output, task)
            ids = feeds[_ids_feed(runner, feeds)]
            logits = out[chosen]
            if logits.ndim != 3 or logits.shape[:2] != ids.shape:
                raise UserError(f"output '{chosen}' has shape {logits.shape}, not logits [batch, tokens, vocab] for "
                                f"ids {ids.shape}; name the logits with --output-name")
            if ids.max() >= logits.shape[-1]:
                raise UserError(f"the data has token id {int(ids.max())} but the model predicts {logits.shape[-1]} tokens; "
                                "use the tokenizer the model was trained with")
            target = ids[:, 1:].reshape(-1)
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            flat_ref = ref_out[chosen][:, :-1].reshape(flat.shape) if ref_out is not None else None
            for s in range(0, len(target), _LOGPROB_ROWS):
                t = target[s:s + _LOGPROB_ROWS]
                lp = _log_softmax(flat[s:s + _LOGPROB_ROWS])
                rows = np.arange(len(t))
                nll[0] -= float(lp[rows, t].sum())
                pred = lp.argmax(axis=1)
                correct += float(np.sum(pred == t))
                if flat_ref is not None:
                    lr = _log_softmax(flat_ref[s:s + _LOGPROB_ROWS])
                    nll[1] -= float(lr[rows, t].sum())
                    pred_ref = lr.argmax(axis=1)
                    correct_ref += float(np.sum(pred_ref == t))
                    agree += float(np.sum(pred == pred_ref))
                    kl += float(np.sum(np.exp(lr) * (lr - lp)))
            tokens += len(target)
        elif task == "embedding":
            chosen = chosen or _pick_output(out, ("sentence_embedding", "embeddings", "pooler_output", "last_hidden_state"),
                                            output, task)
            mask = _mask_of(feeds)
            embs.append(_pool(out[chosen].astype(np.float64), mask))
            ref_embs.append(_pool(ref_out[chosen].astype(np.float64), mask))
        elif task == "classification":
            chosen = chosen or _pick_output(out, ("logits", "output", "probabilities"), output, task)
            pred = out[chosen].argmax(axis=-1)
            if ref_out is not None:
                agree += float(np.sum(pred == ref_out[chosen].argmax(axis=-1)))
            if label_arr is not None:
                lab = label_arr[seen:seen + n_batch]
                if lab.shape != pred.shape:
                    raise UserError(f"labels have shape {lab.shape[1:]} per sample but the predictions {pred.shape[1:]}")
                correct += float(np.sum(pred == lab))
                if ref_out is not None:
                    correct_ref += float(np.sum(ref_out[chosen].argmax(axis=-1) == lab))
            items += pred.size
        seen += n_batch

    metrics: dict[str, float | None] = {}
    if task == "lm":
        metrics["perplexity"] = float(np.exp(nll[0] / tokens))
        if ref_runner:
            metrics["perplexity_reference"] = float(np.exp(nll[1] / tokens))
            metrics["perplexity_ratio"] = metrics["perplexity"] / metrics["perplexity_reference"]
            metrics["top1_agreement"] = agree / tokens
            metrics["kl_divergence"] = kl / tokens
        metrics["top1_accuracy"] = correct / tokens
        if ref_runner:
            metrics["top1_accuracy_reference"] = correct_ref / tokens
        metrics["tokens"] = tokens
    elif task == "embedding":
        metrics.update(embedding_metrics(np.concatenate(embs), np.concatenate(ref_embs)))
    elif task == "classification":
        if ref_runner:
            metrics["top1_agreement"] = agree / items
        if label_arr is not None:
            metrics["accuracy"] = correct / items
            if ref_runner:
                metrics["accuracy_reference"] = correct_ref / items
    per_output = {k: e.result() for k, e in errors.items()}
    if per_output:
        metrics["rel_l2"] = max(e["rel_l2"] for e in per_output.values())
        metrics["max_abs"] = max(e["max_abs"] for e in per_output.values())
        metrics["cosine"] = min(e["cosine"] for e in per_output.values())
    headline, higher = HEADLINE[task]
    if task == "classification" and label_arr is not None:
        headline = "accuracy"
    return EvalResult(task=task, model=label, reference=ref_label, data=source, samples=seen, metrics=metrics,
                      outputs=per_output, headline=headline, higher_is_better=higher)


def _ids_feed(runner: _Runner, feeds: dict[str, np.ndarray]) -> str:
    """The token-id feed among a runner's inputs (integer, not a mask, position or type)."""
    for name in runner.inputs:
        lname = name.lower()
        if np.issubdtype(feeds[name].dtype, np.integer) and not any(w in lname for w in ("mask", "position", "type", "segment")):
            return name
    raise UserError("the model has no integer token-id input; the lm task needs one")


def _evaluate_generate(model: Any, reference: Any, *, data: Any, tokenizer: Any, num_samples: int, seq_len: int,
                       batch_size: int, gen_tokens: int, session_kwargs: dict, progress: bool, label: str,
                       ref_label: str | None) -> EvalResult:
    """The `generate` task (module docstring): greedy generation and cached-path perplexity, model vs reference."""
    from modelsurgeon.model_io import as_model
    from modelsurgeon.progress import progress as progress_bar
    from modelsurgeon.runtime.generate import Decoder, cached_nll, greedy, model_file

    if seq_len < 4:
        raise UserError("the generate task needs --seq-len of at least 4 (prompts are the first half of each window)")
    paths = [model_file(m) if isinstance(m, (str, pathlib.Path)) else m for m in (model, reference)]
    ir_model = as_model(paths[0])
    ids = lm_data(ir_model, data, tokenizer, num_samples, seq_len).arrays[ids_input(ir_model)]
    del ir_model
    decoders = [Decoder(m, label=lab, source=str(m) if isinstance(m, pathlib.Path) else None, **session_kwargs)
                for m, lab in zip(paths, (label, ref_label)) if m is not None]
    half = ids.shape[1] // 2
    nll = [0.0, 0.0]
    tokens = agree_next = agree_gen = before_diff = 0.0
    batches = [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]
    for window in progress_bar(batches, desc="eval generate", total=len(batches), enabled=progress):
        scored = [cached_nll(d, window, half) for d in decoders]
        tokens += scored[0][0].size
        for i, (n, _) in enumerate(scored):
            nll[i] += float(n.sum())
        if len(decoders) > 1:
            agree_next += float(np.sum(scored[0][1] == scored[1][1]))
            made = [greedy(d, window[:, :half], gen_tokens) for d in decoders]
            same = made[0] == made[1]
            agree_gen += float(same.sum())
            before_diff += float(np.where(same.all(1), gen_tokens, np.argmin(same, axis=1)).sum())
    metrics: dict[str, float | None] = {"perplexity": float(np.exp(nll[0] / tokens))}
    if len(decoders) > 1:
        metrics["perplexity_reference"] = float(np.exp(nll[1] / tokens))
        metrics["perplexity_ratio"] = metrics["perplexity"] / metrics["perplexity_reference"]
        metrics["top1_agreement"] = agree_next / tokens
        metrics["token_agreement"] = agree_gen / (len(ids) * gen_tokens)
        metrics["tokens_before_divergence"] = before_diff / len(ids)
    metrics["generated_tokens"] = gen_tokens
    metrics["tokens"] = int(tokens)
    headline = "token_agreement" if len(decoders) > 1 else "perplexity"
    return EvalResult(task="generate", model=label, reference=ref_label, data=str(data), samples=len(ids),
                      metrics=metrics, outputs={}, headline=headline, higher_is_better=len(decoders) > 1)
