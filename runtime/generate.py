"""Running a KV-cache decoder as a generation loop does: prefill, then one token at a time, the cache fed back.

`Decoder(model)` wraps an ONNX Runtime session of a decoder whose inputs are token ids, optionally an
`attention_mask` [batch, past + new] and `position_ids` [batch, new], and a KV cache (`past_key_values.N.key` /
`.value` [batch, kv_heads, past, head_size], or any rank-4 input named like a cache), with outputs `logits` and the
updated cache (`present.N.key` ...), paired with the cache inputs by layer number and key/value (else by order, as
Optimum does). The first step feeds an empty cache (past length 0). Cache sizes the graph leaves symbolic (GenAI's
`kv_cache_dim`) are read from the model's folder: `genai_config.json` (head_size, num_key_value_heads) or
`config.json` (head_dim, else hidden_size / num_attention_heads; num_key_value_heads), as Optimum reads them.

- `Decoder.step(ids, cache)`: one step with the cache as numpy arrays, in and out;
- `Decoder.new_cache(batch, max_length)` and `Decoder.step_kv(ids, kv)`: the same step as a generation runtime
  runs it. Where every cache input feeds only GroupQueryAttention (GenAI's graphs, `fuse`'s output), past and
  present share one buffer of `max_length` positions held by ONNX Runtime (GenAI's `past_present_share_buffer`):
  the step writes its new positions in place, where `step` has the kernel copy the whole cache into a new present
  tensor (at 1024 tokens SmolLM2's cache is 47 MB, copied every token). Other graphs fall back to `step`;
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
        # CPU only: the buffers are host memory, which another provider would copy to its device and back
        self.shares_buffer = self.session.get_providers() == ["CPUExecutionProvider"] and self._shareable(model)

    def _shareable(self, model: Any) -> bool:
        """Whether past and present can share one buffer: every cache input is read by one GroupQueryAttention, as
        its past key or value, whose present output of the same kind is the paired present (ORT's kernel then
        writes the new positions in place), and otherwise only by Shape nodes whose values end in nothing but
        GroupQueryAttention's rotary tables (torch's dynamo export sizes cos/sin by the past length: with a
        max-length buffer the tables get longer, which changes no position the kernel reads). Any other reader would
        see a max-length tensor."""
        import onnx

        if isinstance(model, onnx.ModelProto):
            graph = model.graph
        elif isinstance(model, (str, pathlib.Path)):
            try:
                graph = onnx.load(str(model), load_external_data=False).graph
            except Exception:
                return False
        else:
            return False
        readers: dict[str, list[tuple[Any, int]]] = {}
        for node in graph.node:
            for k, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, k))
        outputs = {o.name for o in graph.output}

        def only_rotary_tables(start: str) -> bool:
            """Every value computed from `start` ends in GroupQueryAttention's cos_cache or sin_cache (inputs 7, 8)."""
            todo, seen = [start], {start}
            while todo:
                name = todo.pop()
                if name in outputs:
                    return False
                for node, k in readers.get(name, []):
                    if node.op_type == "GroupQueryAttention":
                        if k not in (7, 8):
                            return False
                        continue
                    todo += [o for o in node.output if o and o not in seen]
                    seen.update(node.output)
            return True

        for p, present in zip(self.past, self.present):
            uses = readers.get(p.name, [])
            attention = [(n, k) for n, k in uses if n.op_type == "GroupQueryAttention"]
            if len(attention) != 1:
                return False
            node, k = attention[0]
            if k not in (3, 4) or len(node.output) <= k - 2 or node.output[k - 2] != present:
                return False
            if not all(n.op_type == "Shape" and only_rotary_tables(n.output[0]) for n, _ in uses
                       if n is not node):
                return False
        return True

    def new_cache(self, batch: int, max_length: int) -> "KVCache":
        """An empty cache for `step_kv` with room for `max_length` positions (prompt plus generated tokens)."""
        return KVCache(self, batch, max_length)

    def step_kv(self, ids: np.ndarray, kv: "KVCache") -> np.ndarray:
        """Logits [batch, new, vocab] for `ids` [batch, new] after the cache `kv`, which is updated in place."""
        if kv.buffers is None:
            logits, kv.arrays = self.step(ids, kv.arrays)
            kv.length += ids.shape[1]
            return logits
        past, total = kv.length, kv.length + ids.shape[1]
        if total > kv.max_length:
            raise UserError(f"{self.label}: the cache holds {kv.max_length} positions and this step needs {total}; "
                            "make it with a larger max_length")
        binding = kv.binding
        for name, value in self._token_feeds(ids, past).items():
            binding.bind_cpu_input(name, value)  # ORT reads the array in place; the binding holds it alive
        binding.bind_output(self.logits, "cpu")  # else ORT would reuse the last step's logits, of another length
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise self._step_error(past, exc) from None
        kv.length = total
        return binding.get_outputs()[0].numpy()

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), self.types[p.name]) for p, (h, d) in zip(self.past, self.cache_dims)]

    def step(self, ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, new, vocab] for `ids` [batch, new] after `cache`, and the cache including them."""
        past = cache[0].shape[2]
        feeds = self._token_feeds(ids, past)
        feeds.update({p.name: c for p, c in zip(self.past, cache)})
        try:
            out = self.session.run(self.outputs, feeds)
        except Exception as exc:
            raise self._step_error(past, exc) from None
        return out[0], list(out[1:])

    def _token_feeds(self, ids: np.ndarray, past: int) -> dict[str, np.ndarray]:
        """The inputs besides the cache for `ids` [batch, new] after `past` cached tokens: token ids, and the
        attention mask [batch, past + new] and position ids where the graph has them."""
        batch, new = ids.shape
        feeds = {self.ids: np.ascontiguousarray(ids, self.types[self.ids])}
        if self.mask:
            feeds[self.mask] = np.ones((batch, past + new), self.types[self.mask])
        if self.positions:
            feeds[self.positions] = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(self.types[self.positions])
        return feeds

    def _step_error(self, past: int, exc: Exception) -> UserError:
        return UserError(f"{self.label}: ONNX Runtime failed on a decode step with {past} cached tokens "
                         f"({str(exc).strip().splitlines()[0][:200]})")


class KVCache:
    """One generation's cache for `Decoder.step_kv`. Where the decoder `shares_buffer`, one zeroed buffer
    [batch, kv_heads, max_length, head_size] per cache tensor is bound as both the past input and the present output
    and stays with ONNX Runtime; otherwise the cache is the numpy arrays `Decoder.step` passes along."""

    def __init__(self, decoder: Decoder, batch: int, max_length: int):
        import onnxruntime as ort

        self.length = 0
        self.max_length = max_length
        self.buffers = self.binding = None
        self.arrays = decoder.empty_cache(batch)
        if decoder.shares_buffer:
            self.binding = decoder.session.io_binding()
            self.binding.bind_output(decoder.logits, "cpu")  # outputs come back in the order first bound
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, max_length, d), decoder.types[p.name]))
                            for p, (h, d) in zip(decoder.past, decoder.cache_dims)]
            for p, name, buf in zip(decoder.past, decoder.present, self.buffers):
                self.binding.bind_ortvalue_input(p.name, buf)
                self.binding.bind_ortvalue_output(name, buf)


def greedy(decoder: Decoder, prompt: np.ndarray, n: int) -> np.ndarray:
    """The n greedy tokens after `prompt` [batch, P]: one prefill step, then n - 1 decode steps. [batch, n]."""
    prompt = np.asarray(prompt)
    kv = decoder.new_cache(len(prompt), prompt.shape[1] + n)
    logits = decoder.step_kv(prompt, kv)
    tokens = [logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        logits = decoder.step_kv(tokens[-1][:, None], kv)
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
    kv = decoder.new_cache(len(ids), ids.shape[1])
    logits = decoder.step_kv(ids[:, :prefill], kv)
    parts = [_score(logits, ids[:, 1:prefill + 1])]
    for t in range(prefill, ids.shape[1] - 1):
        logits = decoder.step_kv(ids[:, t:t + 1], kv)
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
