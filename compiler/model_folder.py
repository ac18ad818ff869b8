"""Decoder model folders in and out: ONNX Runtime GenAI folders and Optimum `ORTModelForCausalLM` folders.

A folder given as the model (`modelsurgeon compile DIR --passes ... -o OUTDIR`, `modelsurgeon.compile(DIR)`) is
recognized by its config:

- GenAI: `genai_config.json` naming the decoder's ONNX file (`model.decoder.filename`), its input and output
  names (KV cache names as patterns such as `past_key_values.%d.key`) and its sizes (`num_hidden_layers`,
  `num_attention_heads`, `num_key_value_heads`, `head_size`, `hidden_size`), plus tokenizer files;
- Optimum: `config.json` (a Hugging Face config) beside one ONNX file (`model.onnx`), plus
  `generation_config.json` and tokenizer files.

The compiled model is written as a folder of the same kind: the model file under its name (with `<name>.data`
when it has external data), every other file of the input folder copied (the input's model file, its data files
and its config excepted), and the config brought in line with what the passes changed. What changed is read
off the graphs, not the passes: `describe` counts the layers (the transformer blocks, and the KV-cache inputs),
the attention heads, KV heads and head size (the cache's shape and the attention ops), the residual width (the
token embedding) and the MLP width of the model before and after; a field that differs is updated under the
config's name for it (`num_hidden_layers`, GPT-2's `n_layer` ...), and a config list with one entry per layer
(`layer_types`) keeps the kept layers' entries. The KV-cache inputs and outputs of a model that lost blocks
(`drop-blocks` removes them) are renumbered 0..n-1 in layer order, as GenAI's name patterns and Optimum's
`config.json` expect. A change the config cannot express is refused in one line, nothing written: a field the
config has no name for, different sizes per layer, a cache whose layers disagree.

Optimum's `ORTModelForCausalLM` sizes the empty cache it feeds at the first step as hidden_size //
num_attention_heads for most model types (not `head_dim`), so after `slice` (a narrower residual stream, the
same attention) `config.json` keeps `hidden_size` at heads x head size and records the residual width under
`modelsurgeon.hidden_width`; GenAI's `hidden_size` is the residual width.

The output folder is written atomically: a temporary folder beside it, renamed into place (an existing output
folder is replaced only when it holds a config of the same kind, never when it is or holds the input).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Sequence

import onnx_ir as ir

from modelsurgeon.errors import UserError

FOLDER = "modelsurgeon.model_folder"  # model.meta: the ModelFolder the model was loaded from
GENAI, OPTIMUM = "genai", "optimum"
GENAI_CONFIG, HF_CONFIG = "genai_config.json", "config.json"
# role -> name pattern of the KV cache (Optimum's and GenAI's defaults)
DEFAULT_CACHE = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                 "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
INPUT_ROLES = ("past_key_names", "past_value_names")
FIELDS = ("layers", "num_heads", "kv_heads", "head_size", "hidden", "intermediate", "vocab")
# field -> the config's names for it, first found wins (GPT-2: n_layer, n_head, n_embd, n_inner; OPT: ffn_dim ...)
HF_KEYS = {"layers": ("num_hidden_layers", "n_layer", "num_layers"),
           "num_heads": ("num_attention_heads", "n_head"),
           "kv_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
           "head_size": ("head_dim",),
           "hidden": ("hidden_size", "n_embd", "d_model"),
           "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
           "vocab": ("vocab_size",)}
GENAI_KEYS = {"layers": "num_hidden_layers", "num_heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
              "head_size": "head_size", "hidden": "hidden_size"}
# fields a runtime reads to run the model (the cache's shape, the layer loop): never left stale
RUNTIME_FIELDS = ("layers", "num_heads", "kv_heads", "head_size")


@dataclasses.dataclass
class Architecture:
    """What a decoder graph has. None: not found in the graph. `intermediate` is a tuple when blocks differ."""

    layers: int | None = None
    num_heads: int | None = None
    kv_heads: int | None = None
    head_size: int | None = None
    hidden: int | None = None
    intermediate: int | tuple | None = None
    vocab: int | None = None
    cache_layers: tuple[int, ...] = ()  # the layer numbers in the KV-cache input names, in order


@dataclasses.dataclass
class ModelFolder:
    path: pathlib.Path
    kind: str                      # GENAI or OPTIMUM
    model_file: pathlib.Path
    config_file: pathlib.Path
    config: dict
    before: Architecture | None = None  # the input model's, recorded by `compile` before any pass

    def cache_patterns(self) -> dict[str, str]:
        if self.kind != GENAI:
            return dict(DEFAULT_CACHE)
        dec = self.config["model"]["decoder"]
        names = {**dec.get("inputs", {}), **dec.get("outputs", {})}
        return {role: names.get(role, default) for role, default in DEFAULT_CACHE.items()}


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON config ({type(exc).__name__}); fix or re-export the folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; fix or re-export the folder")
    return data


def open_folder(path: str | os.PathLike) -> ModelFolder:
    """The GenAI or Optimum folder at `path`, or a one-line UserError saying what the folder lacks."""
    path = pathlib.Path(path)
    if (path / GENAI_CONFIG).is_file():
        config = _read_json(path / GENAI_CONFIG)
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        dec = model.get("decoder")
        others = sorted(k for k, v in model.items() if isinstance(v, dict) and "filename" in v and k != "decoder")
        if not isinstance(dec, dict) or not isinstance(dec.get("filename"), str):
            raise UserError(f"{path / GENAI_CONFIG}: names no decoder model (model.decoder.filename); give the path "
                            "of its .onnx file instead")
        if others:
            raise UserError(f"{path}: a GenAI folder of several models ({', '.join(['decoder'] + others)}); only "
                            f"decoder-only folders are compiled whole: give {path / dec['filename']} instead")
        file = path / dec["filename"]
        if not file.is_file():
            raise UserError(f"{path / GENAI_CONFIG}: its decoder file {dec['filename']} is missing from {path}")
        return ModelFolder(path, GENAI, file, path / GENAI_CONFIG, config)
    onnx_files = sorted(p for p in path.glob("*.onnx") if p.is_file())
    if (path / HF_CONFIG).is_file() and onnx_files:
        if len(onnx_files) > 1:
            raise UserError(f"{path}: an Optimum folder with {len(onnx_files)} ONNX files "
                            f"({', '.join(p.name for p in onnx_files[:4])}); folders are compiled whole when they hold "
                            "one model (Optimum's model.onnx): give the path of one .onnx file instead")
        config = _read_json(path / HF_CONFIG)
        return ModelFolder(path, OPTIMUM, onnx_files[0], path / HF_CONFIG, config)
    raise UserError(f"{path}: is a folder, but not a model folder (ONNX Runtime GenAI: genai_config.json; Optimum: "
                    "config.json and model.onnx); give the path of an .onnx model file")


# ------------------------------------------------------------------------------------------------ the graph

def _layer_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace("%d", r"(\d+)") + "$")


def cache_values(values: Sequence[ir.Value], pattern: str) -> dict[int, ir.Value]:
    """{layer number: value} of the values whose names fit a cache name pattern such as `past_key_values.%d.key`."""
    rx = _layer_regex(pattern)
    out = {}
    for v in values:
        m = rx.match(v.name or "")
        if m:
            out[int(m.group(1))] = v
    return out


def _one(values: list, what: str):
    """The value all entries share; None when none is known; a UserError when they differ."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    if len(set(known)) > 1:
        raise UserError(f"the model's KV cache has different {what} per layer ({sorted(set(known))}); no config can "
                        "say that: compile the .onnx file instead of the folder")
    return known[0]


def describe(model: ir.Model, patterns: dict[str, str] | None = None) -> Architecture:
    """The sizes of a decoder graph (see the module docstring). Reads a structural clone, so `model` is untouched."""
    from modelsurgeon.canonical import canonicalize
    from modelsurgeon.context import PassContext
    from modelsurgeon.input_dims import _from_graph

    patterns = patterns or DEFAULT_CACHE
    arch = Architecture()
    inputs = list(model.graph.inputs)
    keys = cache_values(inputs, patterns["past_key_names"])
    vals = cache_values(inputs, patterns["past_value_names"])
    arch.cache_layers = tuple(sorted(set(keys) | set(vals)))
    cache = [v for v in (*keys.values(), *vals.values()) if v.shape is not None and len(v.shape) == 4]
    graph_dims = _from_graph(model, cache) if cache else {}

    def dim(v: ir.Value, axis: int) -> int | None:
        d = v.shape[axis]
        return int(d) if isinstance(d, int) else graph_dims.get(v.name, {}).get(axis)

    arch.kv_heads = _one([dim(v, 1) for v in cache], "KV heads")
    arch.head_size = _one([dim(v, 3) for v in cache], "head sizes")
    heads = []
    for node in model.graph:
        if node.domain == "com.microsoft" and node.op_type in ("GroupQueryAttention", "MultiHeadAttention"):
            a = node.attributes.get("num_heads")
        elif node.domain in ("", "ai.onnx") and node.op_type == "Attention":
            a = node.attributes.get("q_num_heads")
        else:
            continue
        heads.append(int(a.value) if a is not None else None)
    arch.num_heads = _one(heads, "attention heads")
    logits = next((o for o in model.graph.outputs if "logits" in (o.name or "")), None)
    if logits is not None and logits.shape is not None and isinstance(logits.shape[-1], int):
        arch.vocab = int(logits.shape[-1])

    clone = model.clone()  # tensors shared, nodes and values copied: canonicalize edits the clone only
    canonicalize(clone)
    tb = PassContext(model=clone, progress=False).analysis("blocks")
    if tb.blocks:
        arch.layers = len(tb.blocks)
        if tb.embedding is not None:
            arch.hidden = int(tb.embedding.width)
        widths = []
        for b in tb.blocks:
            w = b.down.in_features if b.down is not None else b.up.out_features if b.up is not None else None
            widths.append(w)
        if all(w is not None for w in widths):
            arch.intermediate = widths[0] if len(set(widths)) == 1 else tuple(widths)
        if arch.num_heads is None and arch.head_size:
            first = tb.blocks[0]
            if first.q is not None:
                arch.num_heads = first.q.out_features // arch.head_size
            elif first.qkv is not None and arch.kv_heads:
                arch.num_heads = first.qkv.out_features // arch.head_size - 2 * arch.kv_heads
    elif arch.cache_layers:
        arch.layers = len(arch.cache_layers)
    return arch


# ------------------------------------------------------------------------------------------------ the config

@dataclasses.dataclass
class FolderPlan:
    """What writing the folder changes: the new config, cache renames {old name: new name}, and notes."""

    config: dict
    renames: dict[str, str]
    changed: dict[str, tuple]


def kept_layers(report_rows: Sequence[Any], layers: int) -> list[int] | None:
    """The input's layer numbers left after the drop-blocks rows of a report (their `removed_indices`, each counted
    in the model that pass saw), or None when a row does not say."""
    kept = list(range(layers))
    for row in report_rows:
        if not str(getattr(row, "name", "")).startswith("drop-blocks"):
            continue
        removed = (getattr(row, "notes", None) or {}).get("removed_indices")
        if removed is None or any(i >= len(kept) for i in removed):
            return None
        kept = [k for i, k in enumerate(kept) if i not in set(removed)]
    return kept


def plan(folder: ModelFolder, model: ir.Model, report_rows: Sequence[Any] = (), passes: str = "") -> FolderPlan:
    """The config and cache names for `model`, compiled from `folder`'s model; UserError for what cannot be said."""
    before = folder.before
    if before is None:
        raise UserError("the folder's input model was not described before compiling; compile with "
                        "modelsurgeon.compile(FOLDER, ...)")
    patterns = folder.cache_patterns()
    after = describe(model, patterns)
    renames: dict[str, str] = {}
    kept = list(after.cache_layers) if after.cache_layers else None
    if kept is not None:
        if kept and not set(kept) <= set(before.cache_layers):
            raise UserError(f"the compiled model's KV cache names layers {kept}, the input's {list(before.cache_layers)}")
        renames = _cache_renames(model, patterns, kept)
        if after.layers is not None and after.layers != len(kept):
            raise UserError(f"the compiled model has {after.layers} blocks but KV-cache inputs for {len(kept)} "
                            "layers; it cannot be shipped as a folder: write an .onnx file instead")
        after.layers = len(kept)
    elif before.layers is not None and after.layers != before.layers:
        kept = kept_layers(report_rows, before.layers)

    changed = {f: (getattr(before, f), getattr(after, f)) for f in FIELDS
               if getattr(before, f) is not None and getattr(before, f) != getattr(after, f)}
    unknown = [f for f, (_, a) in changed.items() if a is None]
    if unknown:
        raise UserError(f"cannot tell the compiled model's {_label(unknown[0])} (the input's was "
                        f"{getattr(before, unknown[0])}), so its config cannot be updated; write an .onnx file instead")
    config = copy.deepcopy(folder.config)
    if folder.kind == GENAI:
        _update_genai(config, changed, before)
    else:
        _update_hf(config, changed, before, after, kept, passes)
    return FolderPlan(config, renames, changed)


def _label(field: str) -> str:
    return {"layers": "number of layers", "num_heads": "attention heads", "kv_heads": "KV heads",
            "head_size": "head size", "hidden": "hidden size", "intermediate": "MLP width (intermediate size)",
            "vocab": "vocabulary size"}[field]


def _refuse_mixed(changed: dict[str, tuple], kind: str) -> None:
    for f, (_, a) in changed.items():
        if isinstance(a, tuple):
            raise UserError(f"the compiled model's blocks have different {_label(f)}s ({', '.join(map(str, a))}); "
                            f"{kind}'s config holds one: write an .onnx file instead, or prune every block alike")


def _update_genai(config: dict, changed: dict[str, tuple], before: Architecture) -> None:
    dec = config["model"]["decoder"]
    _refuse_mixed({f: v for f, v in changed.items() if f in GENAI_KEYS}, "GenAI")
    for field, (b, a) in changed.items():
        if field == "vocab":
            config["model"]["vocab_size"] = a
            continue
        if field == "intermediate":
            continue  # genai_config.json has no MLP width: nothing reads it
        key = GENAI_KEYS[field]
        if key not in dec and field in RUNTIME_FIELDS:
            raise UserError(f"genai_config.json has no model.decoder.{key} to change from {b} to {a}; GenAI would run "
                            "the model with the old value: write an .onnx file instead")
        dec[key] = a


def _hf_section(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _update_hf(config: dict, changed: dict[str, tuple], before: Architecture, after: Architecture,
               kept: list[int] | None, passes: str) -> None:
    section = _hf_section(config)
    _refuse_mixed(changed, "config.json")
    notes: dict[str, Any] = {}
    hidden_change = changed.pop("hidden", None)
    for field, (b, a) in changed.items():
        key = next((k for k in HF_KEYS[field] if k in section), None)
        if key is None and field == "kv_heads" and after.num_heads is not None and a == after.num_heads:
            continue  # no num_key_value_heads: as many KV heads as heads, which still holds
        if key is None and field == "head_size":
            key = "head_dim"  # written so that readers that know it take it; Optimum reads hidden_size below
        if key is None and field == "intermediate":
            notes["intermediate_size"] = a
            continue
        if key is None:
            raise UserError(f"config.json has no field for the {_label(field)} ({' / '.join(HF_KEYS[field])}) to "
                            f"change from {b} to {a}; write an .onnx file instead")
        section[key] = a
    if hidden_change is not None:
        notes["hidden_width"] = hidden_change[1]
    heads = after.num_heads or before.num_heads
    size = after.head_size or before.head_size
    hkey = next((k for k in HF_KEYS["hidden"] if k in section), None)
    if heads and size and hkey is not None:
        # ORTModelForCausalLM sizes the first step's empty cache as hidden_size // num_attention_heads
        if section[hkey] != heads * size and (hidden_change is not None or "num_heads" in changed or "head_size" in changed):
            section[hkey] = heads * size
    elif hidden_change is not None and hkey is not None:
        section[hkey] = hidden_change[1]
        notes.pop("hidden_width")
    if "layers" in changed:
        n_before, n_after = changed["layers"]
        for key, value in list(section.items()):
            if isinstance(value, list) and len(value) == n_before:
                if kept is None or len(kept) != n_after:
                    raise UserError(f"config.json's '{key}' has one entry per layer, and which layers were kept is "
                                    "not known; write an .onnx file instead")
                section[key] = [value[i] for i in kept]
    if notes or passes:
        config["modelsurgeon"] = {**({"passes": passes} if passes else {}), **notes}


def _cache_renames(model: ir.Model, patterns: dict[str, str], kept: list[int]) -> dict[str, str]:
    """{old name: new name} numbering the kept layers' cache inputs and outputs 0..n-1 (empty when they are)."""
    renames = {}
    for role, pattern in patterns.items():
        values = model.graph.inputs if role in INPUT_ROLES else model.graph.outputs
        found = cache_values(list(values), pattern)
        if set(found) != set(kept):
            raise UserError(f"the compiled model's {pattern.replace('%d', 'N')} names layers {sorted(found)}, but its "
                            f"KV-cache inputs layers {kept}; write an .onnx file instead")
        for new, old in enumerate(kept):
            if new != old:
                renames[pattern % old] = pattern % new
    return renames


def rename_values(model: ir.Model, renames: dict[str, str]) -> None:
    """Rename graph inputs/outputs in place, through temporary names so that swaps cannot collide."""
    values = {v.name: v for v in (*model.graph.inputs, *model.graph.outputs)}
    taken = {v.name for node in model.graph for v in node.outputs} | set(values)
    clash = [new for new in renames.values() if new in taken and new not in renames]
    if clash:
        raise UserError(f"cannot renumber the KV cache: the model already has a value named '{clash[0]}'")
    for i, old in enumerate(renames):
        values[old].name = f"__modelsurgeon_renumber_{i}"
    for i, new in enumerate(renames.values()):
        values[list(renames)[i]].name = new


# ------------------------------------------------------------------------------------------------ writing

def check_output(output: str | os.PathLike, folder: ModelFolder, report: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, an output folder that is, holds or lies inside the input folder, is a file, or is
    a folder of something else; and a report path that collides with the input."""
    from modelsurgeon.write_targets import check_targets, protected_files

    out = pathlib.Path(output)
    src = folder.path.resolve()
    res = out.resolve()
    if res == src or src in res.parents or res in src.parents:
        raise UserError(f"{out}: the output folder is, holds or lies inside the input folder {folder.path}; choose "
                        "another output path (modelsurgeon never changes its input)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; the output of a model folder is a folder: give a new folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / folder.config_file.name).is_file():
        raise UserError(f"{out}: a folder that holds other files (no {folder.config_file.name}); give a new or empty "
                        "folder path")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    targets = [(parent / ".modelsurgeon-probe-folder", "output folder")]
    if report is not None:
        targets.append((pathlib.Path(report), "report"))
    check_targets(targets, protected_files(folder.model_file))


def write(folder: ModelFolder, model: ir.Model, output: str | os.PathLike, *, external_data: bool | None = None,
          report_rows: Sequence[Any] = (), passes: str = "") -> pathlib.Path:
    """Write `model` (compiled from `folder`'s model) as a folder of the same kind at `output`, atomically."""
    from modelsurgeon.model_io import save
    from modelsurgeon.write_targets import input_files

    out = pathlib.Path(output)
    check_output(out, folder)
    plan_ = plan(folder, model, report_rows, passes)
    rename_values(model, plan_.renames)
    skip = {p.resolve() for p in input_files(folder.model_file)} | {folder.config_file.resolve()}
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".modelsurgeon-", dir=parent))
    aside = None
    try:
        save(model, tmp / folder.model_file.name, external_data=external_data, input_path=folder.model_file)
        for entry in sorted(folder.path.iterdir()):
            if entry.resolve() in skip or entry.name.startswith(".modelsurgeon-"):
                continue
            try:
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name)
                elif entry.is_file():
                    shutil.copy2(entry, tmp / entry.name)
            except OSError as exc:
                raise UserError(f"{out}: could not copy {entry.name} ({exc.strerror or exc}); free disk space or "
                                "choose another path") from None
        indent = 4 if folder.kind == GENAI else 2
        (tmp / folder.config_file.name).write_text(json.dumps(plan_.config, indent=indent) + "\n", encoding="utf-8")
        if out.exists():
            aside = pathlib.Path(tempfile.mkdtemp(prefix=".modelsurgeon-old-", dir=parent)) / "old"
            os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            if aside is not None:
                os.replace(aside, out)  # the previous output stays as it was
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
    return out
