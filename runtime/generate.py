"""Running a KV-cache decoder as a generation loop does: prefill, then one token at a time, the cache fed back.

`Decoder(model)` wraps an ONNX Runtime session of a decoder whose inputs are token ids, optionally an
`attention_mask` [batch, past + new] and `position_ids` [batch, new], and a KV cache (`past_key_values.N.key` /
`.value` [batch, kv_heads, past, head_size], or any rank-4 input named like a cache), with outputs `logits` and the
updated cache (`present.N.key` ...), paired with the cache inputs by layer number and key/value (else by order, as
Optimum does). The first step feeds an empty cache (past length 0). Cache sizes the graph leaves symbolic (GenAI's
`kv_cache_dim`) are read from the model's folder: `genai_config.json` (head_size, num_key_value_heads) or
`config.json` (head_dim, else hidden_size / num_attention_heads; num_key_value_heads), as Optimum reads them.

- `greedy(decoder, prompt, n)`: the n argmax tokens after `prompt` [batch, P], one decode step each;
- `cached_nll(decoder, ids, prefill)`: next-token negative log-likelihood of windows [batch, T] computed the way
  generation computes logits: the first `prefill` tokens in one step, then the rest one token per step.

It cannot run encoder-decoders, cache layouts other than [batch, heads, past, head_size] (Bloom's fused one), or
models whose attention needs inputs besides those above (cache_position, token_type_ids): they are refused.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from modelsurgeon.errors import UserError

CACHE = re.compile(r"(^|[._/])(past|cache)([._/\d]|_key|_value|$)", re.IGNORECASE)
_LAYER = re.compile(r"(\d+)")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _slot(name: str) -> tuple[int, str] | None:
    """(layer number, 'key'|'value') of a cache tensor's name, None when it says neither."""
    layer = _LAYER.search(name)
    kinds = re.findall(r"key|value", name.lower())  # the last one: past_key_values.0.value is a value
    return (int(layer.group(1)), kinds[-1]) if layer and kinds else None


def _folder_sizes(path: pathlib.Path | None) -> dict[str, int]:
    """{"kv_heads", "head_size"} from the model folder's configs, where they say."""
    if path is None:
        return {}
    folder = path.parent

    def read(name: str) -> dict:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    out: dict[str, int] = {}
    dec = read("genai_config.json").get("model", {}).get("decoder", {})
    if dec:
        out = {k: dec[g] for k, g in (("kv_heads", "num_key_value_heads"), ("head_size", "head_size"))
               if isinstance(dec.get(g), int)}
    cfg = read("config.json")
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    if cfg:
        heads = cfg.get("num_attention_heads") or cfg.get("n_head")
        hidden = cfg.get("hidden_size") or cfg.get("n_embd")
        size = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None)
        kv = cfg.get("num_key_value_heads") or heads
        out.setdefault("head_size", size) if isinstance(size, int) else None
        out.setdefault("kv_heads", kv) if isinstance(kv, int) else None
    return out


class Decoder:
    """A decoder session driven step by step with its KV cache (see the module docstring)."""

    def __init__(self, model: Any, *, label: str = "model", providers: Sequence[str] | None = None,
                 threads: int | None = None, accuracy_level: int | None = None, source: str | None = None):
        from modelsurgeon.runtime.session import make_session

        self.label = label
        try:
            self.session = make_session(model, providers=providers, threads=threads, accuracy_level=accuracy_level)
        except Exception as exc:
            raise UserError(f"{label}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        self.types = {i.name: _NP.get(i.type, np.float32) for i in inputs}
        self.past = [i for i in inputs if CACHE.search(i.name) and len(i.shape) == 4]
        if not self.past:
            raise UserError(f"{label}: has no KV-cache inputs (past_key_values.N.key ...); generation needs a decoder "
                            "exported with its cache (Optimum text-generation-with-past, GenAI, torch with past)")
        rest = [i.name for i in inputs if i not in self.past]
        self.ids = next((n for n in rest if "ids" in n.lower() and "position" not in n.lower()), None)
        self.mask = next((n for n in rest if "mask" in n.lower()), None)
        self.positions = next((n for n in rest if "position" in n.lower()), None)
        other = [n for n in rest if n not in (self.ids, self.mask, self.positions)]
        if self.ids is None or other:
            raise UserError(f"{label}: cannot drive input '{(other or ['token ids'])[0]}' in a generation loop; the "
                            "loop feeds token ids, attention_mask, position_ids and the KV cache")
        self.logits = "logits" if "logits" in outputs else outputs[0]
        present = [o for o in outputs if o != self.logits]
        if len(present) != len(self.past):
            raise UserError(f"{label}: {len(self.past)} KV-cache inputs but {len(present)} cache outputs")
        slots = {_slot(o): o for o in present}
        if all(_slot(p.name) in slots for p in self.past) and len(slots) == len(present):
            self.present = [slots[_slot(p.name)] for p in self.past]
        else:
            self.present = present  # Optimum pairs them by order
        self.outputs = [self.logits, *self.present]
        path = pathlib.Path(source) if source else pathlib.Path(model) if isinstance(model, (str, pathlib.Path)) else None
        sizes = _folder_sizes(path)
        self.cache_dims = []
        for p in self.past:
            heads = p.shape[1] if isinstance(p.shape[1], int) else sizes.get("kv_heads")
            size = p.shape[3] if isinstance(p.shape[3], int) else sizes.get("head_size")
            if heads is None or size is None:
                raise UserError(f"{label}: the KV cache '{p.name}' has symbolic heads or head size {p.shape} and no "
                                "genai_config.json or config.json beside the model says them")
            self.cache_dims.append((int(heads), int(size)))

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), self.types[p.name]) for p, (h, d) in zip(self.past, self.cache_dims)]

    def step(self, ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, new, vocab] for `ids` [batch, new] after `cache`, and the cache including them."""
        batch, new = ids.shape
        past = cache[0].shape[2]
        feeds = {self.ids: ids.astype(self.types[self.ids])}
        if self.mask:
            feeds[self.mask] = np.ones((batch, past + new), self.types[self.mask])
        if self.positions:
            feeds[self.positions] = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(self.types[self.positions])
        feeds.update({p.name: c for p, c in zip(self.past, cache)})
        try:
            out = self.session.run(self.outputs, feeds)
        except Exception as exc:
            raise UserError(f"{self.label}: ONNX Runtime failed on a decode step with {past} cached tokens "
                            f"({str(exc).strip().splitlines()[0][:200]})") from None
        return out[0], list(out[1:])


def greedy(decoder: Decoder, prompt: np.ndarray, n: int) -> np.ndarray:
    """The n greedy tokens after `prompt` [batch, P]: one prefill step, then n - 1 decode steps. [batch, n]."""
    logits, cache = decoder.step(np.asarray(prompt), decoder.empty_cache(len(prompt)))
    tokens = [logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        logits, cache = decoder.step(tokens[-1][:, None], cache)
        tokens.append(logits[:, -1].argmax(-1))
    return np.stack(tokens, axis=1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _score(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NLL of `target` [batch, k] under `logits` [batch, k, vocab] and the argmax, one position at a time (memory:
    one [batch, vocab] float64 array)."""
    nll = np.empty(target.shape, np.float64)
    for j in range(target.shape[1]):
        lp = _log_softmax(logits[:, j])
        nll[:, j] = -lp[np.arange(len(lp)), target[:, j]]
    return nll, logits.argmax(-1)


def cached_nll(decoder: Decoder, ids: np.ndarray, prefill: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position next-token NLL [batch, T - 1] of `ids` [batch, T], and the argmax predictions [batch, T - 1]:
    tokens [0, prefill) in one step, the rest one per step with the cache."""
    ids = np.asarray(ids)
    prefill = max(1, min(prefill, ids.shape[1] - 1))
    logits, cache = decoder.step(ids[:, :prefill], decoder.empty_cache(len(ids)))
    parts = [_score(logits, ids[:, 1:prefill + 1])]
    for t in range(prefill, ids.shape[1] - 1):
        logits, cache = decoder.step(ids[:, t:t + 1], cache)
        parts.append(_score(logits, ids[:, t + 1:t + 2]))
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)


def model_file(path: str | pathlib.Path) -> pathlib.Path:
    """The ONNX file of a model path: the path itself, or a GenAI folder's decoder file or an Optimum folder's one
    .onnx file."""
    path = pathlib.Path(path)
    if not path.is_dir():
        return path
    try:
        name = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]["filename"]
        return path / name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = sorted(path.glob("*.onnx"))
    if len(files) == 1:
        return files[0]
    raise UserError(f"{path}: is a folder without genai_config.json or exactly one .onnx file; give the model file")
