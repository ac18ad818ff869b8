"""A corpus of small exported models: every architecture through every exporter that applies, cached on disk.

    from modelsurgeon.models import corpus
    for entry in corpus.entries():               # Entry(name="llama/dynamo18", arch="llama", exporter="dynamo18")
        path = entry.path()                      # cached export; raises corpus.Unavailable(reason) when it cannot be made
    corpus.run_cell(path, "quant4")              # Outcome("verified" | "refused" | "broken" | "internal error", ...)

Models are random-weight, seeded (same key, same weights), and small (2 layers, hidden 64, vocab 512 or 1024) so each
exports in seconds. They are built from `transformers` config classes (`build_torch(arch)`); the 1-D parameters
(norm gains, biases) get seeded noise on top of the library's init so that exact rewrites (fold-norms) have something
to fold. Architectures (`ARCHS`):

- `llama`: Llama with grouped-query attention (4 heads, 2 KV heads), untied LM head; `llama-tied`: the same, tied.
- `qwen2`: Qwen2 (q/k/v biases, GQA), vocab 1024.  `phi3`: Phi-3 (fused qkv_proj and gate_up_proj).
- `gpt2`: GPT-2 (Conv1D projections, learned positions, tied head).  `gemma`: Gemma (multi-query attention,
  (1 + w) RMSNorm, GeGLU, embeddings scaled by sqrt(hidden), tied head).
- `bert`: BertModel (last_hidden_state).  `vit`: ViTForImageClassification (32x32 images, 8x8 patches, 10 classes).
- `helper`: a decoder built with `onnx.helper` (embedding, LayerNorm, 4-head attention, ReLU MLP, LM head) and no
  value_info, as hand-written graphs come.
- `light-*`: the ONNX wheel's light model zoo (`onnx/backend/test/data/light/*.onnx`: AlexNet, DenseNet-121,
  Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512; constant weights made by the graph).
- `tv-*`: torchvision's classifiers (`TORCHVISION`: resnet18, mobilenet_v3_small, efficientnet_b0, regnet_x_400mf,
  convnext_tiny, vit_b_16, swin_t, densenet121, shufflenet_v2_x1_0, squeezenet1_0, googlenet, mnasnet1_0), seeded
  random weights (`weights=None`), at a small input resolution where the architecture allows it; exported by
  `dynamo18` only (what they test is the graphs of real CNN and vision-transformer designs, not the exporters).

Exporters (`EXPORTERS`; `applies(arch, exporter)` says which pairs exist):

- `dynamo18`, `dynamo23`: `torch.onnx.export(dynamo=True)` at that opset, `input_ids` only (text) or `pixel_values`
  (ViT); `dynamo18-mask`, `dynamo23-mask`: with `attention_mask`; `dynamo18-kv`, `dynamo23-kv` (decoders): with a
  KV cache, inputs `input_ids`, `attention_mask` [batch, past + seq], `past_key_values.N.key/value`, outputs
  `logits`, `present.N.key/value`. Dynamic batch and sequence.
- `torchscript`: the TorchScript exporter (`dynamo=False`, opset 17; with `attention_mask` for text models).
- `fp16`: `dynamo18` of the model in float16.
- `optimum`, `optimum-past`: Optimum (`python -m optimum.exporters.onnx`, itself the TorchScript exporter; tasks
  feature-extraction (BERT), image-classification (ViT), text-generation and text-generation-with-past (decoders)).
- `genai-fp32`, `genai-int4`: ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder -i
  HF_DIR -o OUT -p fp32|int4 -e cpu`) for the decoders it supports (all but GPT-2).

Both need a Hugging Face folder: `save_hf` writes the same seeded model with `save_pretrained`, plus a tiny byte-level
tokenizer.json made with `tokenizers` (the GenAI builder loads a tokenizer). GenAI 0.18's builder needs `transformers`
5, as here: it is the `corpus` extra and runs in a subprocess of this Python. Optimum needs `transformers<5`: it runs
in `.venv-exporters` (made by setup.sh from models/corpus_exporters.txt), through this file run as a script with that
venv's python (`python models/corpus.py export ARCH EXPORTER OUT`; it imports nothing of modelsurgeon), which saves
the folder with the venv's `transformers` and exports it. Without the venv or the extra those entries raise
`Unavailable`, naming the command that installs them.

Cache: `$MODELSURGEON_CACHE/corpus/<arch>-<exporter>-<key>/model.onnx` (GenAI's folder keeps its model.onnx.data and
genai_config.json beside it), where the key hashes the config, the exporter, the seed, `VERSION` (bumped when a
recipe changes) and the versions of the packages that made it (torch, transformers, onnx, onnxscript, onnx-ir here,
plus onnxruntime-genai for GenAI; the venv's own for Optimum). An export that fails is cached too, as `<...>.failed`
holding its one-line reason, so that a failing exporter costs its time once; `Entry.path()` raises `Unavailable` with
that reason.

The matrix: `run_cell(path, spec)` compiles with calibration synthesized by the compile's defaults, saves the result
and loads it in ONNX Runtime; `matrix(models, passes)` runs every cell (tests/test_corpus.py, benchmarks/corpus.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

VERSION = "1"  # part of every cache key: bump it when an export recipe below changes
ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-exporters"
VENV_REQUIREMENTS = ROOT / "models" / "corpus_exporters.txt"  # what setup.sh installs into VENV (pinned)
SEED = 0
EXPORT_TIMEOUT = 300  # seconds for one export in a subprocess (Optimum, GenAI)

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# arch -> (config class, model class, kind, config kwargs). kind: "decoder" (input_ids -> logits), "encoder"
# (input_ids [, attention_mask] -> last_hidden_state), "vision" (pixel_values -> logits).
ARCHS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "decoder",
              dict(_TEXT, vocab_size=512, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", "decoder",
                   dict(_TEXT, vocab_size=512, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "decoder",
              dict(_TEXT, vocab_size=1024, num_key_value_heads=2, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "decoder",
             dict(_TEXT, vocab_size=512, num_key_value_heads=4, original_max_position_embeddings=256,
                  tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "decoder",
             dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128, bos_token_id=1,
                  eos_token_id=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "decoder",
              dict(_TEXT, vocab_size=512, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "bert": ("BertConfig", "BertModel", "encoder",
             dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=256, pad_token_id=0)),
    "vit": ("ViTConfig", "ViTForImageClassification", "vision",
            dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, num_labels=10)),
}
GENAI_ARCHS = ("llama", "llama-tied", "qwen2", "phi3", "gemma")  # the builder has no GPT-2

# exporter -> (environment, kinds it applies to)
EXPORTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dynamo18": ("main", ("decoder", "encoder", "vision")),
    "dynamo18-mask": ("main", ("decoder", "encoder")),
    "dynamo18-kv": ("main", ("decoder",)),
    "dynamo23": ("main", ("decoder", "encoder", "vision")),
    "dynamo23-mask": ("main", ("decoder", "encoder")),
    "dynamo23-kv": ("main", ("decoder",)),
    "torchscript": ("main", ("decoder", "encoder", "vision")),
    "fp16": ("main", ("decoder", "encoder", "vision")),
    "optimum": ("venv", ("decoder", "encoder", "vision")),
    "optimum-past": ("venv", ("decoder",)),
    "genai-fp32": ("genai", ("decoder",)),
    "genai-int4": ("genai", ("decoder",)),
}
# The slow test's subset (tests/test_corpus.py): every architecture and every exporter at least once (Llama through
# all of them), the two smallest light-zoo graphs and two torchvision graphs (depthwise and squeeze-excite
# convolutions; channel shuffles and splits) (the whole corpus takes about 20 minutes). The tied Llama from Optimum,
# Qwen2 from TorchScript, Phi-3 from Optimum and GPT-2 in fp16 left it to shorten the suite, which ran past 30 minutes
# on 2 cores (about 2 minutes of cells; TorchScript graphs cost twice a dynamo one's per cell): their exporters stay covered by
# other architectures here, and those exports by their own tests (block finder, slice, input dims).
TEST_MODELS = (
    "llama/dynamo18", "llama/dynamo18-kv", "llama/dynamo23", "llama/torchscript", "llama/fp16", "llama/optimum",
    "llama/optimum-past", "llama/genai-fp32", "llama/genai-int4",
    "llama-tied/dynamo18-mask",
    "qwen2/dynamo18-mask",
    "phi3/dynamo18",
    "gpt2/dynamo18", "gpt2/dynamo23-mask", "gpt2/optimum",
    "gemma/dynamo18-mask", "gemma/dynamo23-kv", "gemma/genai-int4",
    "bert/dynamo18-mask", "bert/dynamo23", "bert/torchscript", "bert/optimum",
    "vit/dynamo18", "vit/optimum",
    "helper/onnx.helper", "light-squeezenet/onnx zoo", "light-shufflenet/onnx zoo",
    "tv-mobilenet_v3_small/dynamo18", "tv-shufflenet_v2_x1_0/dynamo18",  # the two cheapest torchvision graphs
)
# torchvision architectures (arch `tv-NAME`): NAME -> (input resolution, constructor kwargs). Small resolutions keep
# the prune test of all twelve within minutes on two cores (the MAC ratio, not the absolute count, is what matters):
# 64x64 for the CNNs (every stage keeps at least 2x2), ViT-B/16 at 64 (`image_size` is a constructor argument: 16
# tokens of 4x4 patches), Swin-T at 224 (its 7x7 windows and the shifted-window mask are what the graph is about: at
# 224 every stage holds whole windows).
TORCHVISION: dict[str, tuple[int, dict[str, Any]]] = {
    "resnet18": (64, {}),
    "mobilenet_v3_small": (64, {}),
    "efficientnet_b0": (64, {}),
    "regnet_x_400mf": (64, {}),
    "convnext_tiny": (64, {}),
    "vit_b_16": (64, {"image_size": 64}),
    "swin_t": (224, {}),
    "densenet121": (64, {}),
    "shufflenet_v2_x1_0": (64, {}),
    "squeezenet1_0": (64, {}),
    "googlenet": (64, {"aux_logits": False, "init_weights": True}),
    "mnasnet1_0": (64, {}),
}
TV_EXPORTER = "dynamo18"
TV_VERSION = "2"  # part of the torchvision entries' cache keys: bump it when `build_torchvision` changes
OPTIMUM_TASKS = {"decoder": "text-generation", "encoder": "feature-extraction", "vision": "image-classification"}
HELPER_OPSET = 18


class Unavailable(Exception):
    """A corpus entry that cannot be made here (its exporter is not installed, or the export failed): one line why."""


class _Transient(Unavailable):
    """A failure that says nothing about the exporter: unavailable now, but not cached as failed."""


class _TimedOut(_Transient):
    """An export that ran out of time (a busy machine may be the cause)."""


def light_dir() -> pathlib.Path:
    import importlib.util

    return pathlib.Path(importlib.util.find_spec("onnx").submodule_search_locations[0]) / "backend/test/data/light"


def light_models() -> list[str]:
    return sorted(p.stem.replace("light_", "") for p in light_dir().glob("light_*.onnx"))


def applies(arch: str, exporter: str) -> bool:
    if arch.startswith("tv-"):
        return arch[3:] in TORCHVISION and exporter == TV_EXPORTER
    kind = ARCHS[arch][2]
    if kind not in EXPORTERS[exporter][1]:
        return False
    return not exporter.startswith("genai") or arch in GENAI_ARCHS


@dataclasses.dataclass(frozen=True)
class Entry:
    """One corpus model: `arch/exporter` (`helper/onnx.helper`, `light-NAME/onnx zoo` for the fixed graphs)."""

    arch: str
    exporter: str

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.exporter}"

    @property
    def needs_venv(self) -> bool:
        return EXPORTERS.get(self.exporter, ("main",))[0] == "venv"

    def path(self) -> pathlib.Path:
        """The model's ONNX file, exported (once) if needed; `Unavailable` when it cannot be made here."""
        if self.arch.startswith("light-"):
            return light_dir() / f"light_{self.arch[len('light-'):]}.onnx"
        if self.arch == "helper":
            return _cached(self, {"opset": HELPER_OPSET, "onnx": main_versions()["onnx"]},
                           lambda out: build_helper(out / "model.onnx"))
        if self.arch.startswith("tv-"):
            name = self.arch[3:]
            versions = {**main_versions(), "torchvision": torchvision_version()}
            return _cached(self, {"versions": versions, "config": TORCHVISION[name], "recipe": TV_VERSION},
                           lambda out: export_torchvision(name, out / "model.onnx"))
        if self.needs_venv:
            versions = venv_versions()  # raises Unavailable without the venv
            return _cached(self, {"versions": versions, "config": ARCHS[self.arch]},
                           lambda out: _venv_export(self.arch, self.exporter, out))
        if self.exporter.startswith("genai"):
            versions = {**main_versions(), "onnxruntime-genai": genai_version()}
            return _cached(self, {"versions": versions, "config": ARCHS[self.arch]},
                           lambda out: genai_export(self.arch, self.exporter, out))
        return _cached(self, {"versions": main_versions(), "config": ARCHS[self.arch]},
                       lambda out: export_main(self.arch, self.exporter, out / "model.onnx"))


def entries(include_light: bool = True) -> list[Entry]:
    """Every corpus model, architectures in `ARCHS` order, then the helper graph and the light zoo."""
    out = [Entry(a, e) for a in ARCHS for e in EXPORTERS if applies(a, e)]
    out += [Entry(f"tv-{name}", TV_EXPORTER) for name in TORCHVISION]
    out.append(Entry("helper", "onnx.helper"))
    if include_light:
        out += [Entry(f"light-{n}", "onnx zoo") for n in light_models()]
    return out


def entry(name: str) -> Entry:
    arch, _, exporter = name.partition("/")
    return Entry(arch, exporter)


# ------------------------------------------------------------------------------------------------ the cache

def cache_key(entry: Entry, extra: dict[str, Any]) -> str:
    blob = json.dumps({"arch": entry.arch, "exporter": entry.exporter, "version": VERSION, "seed": SEED, **extra},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cached(entry: Entry, extra: dict[str, Any], make) -> pathlib.Path:
    """`<cache>/corpus/<arch>-<exporter>-<key>/model.onnx`, made by `make(tmp_folder)` once; failures cached."""
    from modelsurgeon.models.cache import cache_dir, file_lock

    root = cache_dir("corpus")
    stem = f"{entry.arch}-{entry.exporter}".replace("/", "_").replace(" ", "_") + "-" + cache_key(entry, extra)
    folder, failed = root / stem, root / f"{stem}.failed"
    model = folder / "model.onnx"
    if not model.exists() and not failed.exists():
        with file_lock(root / f"{stem}.lock"):
            if not model.exists() and not failed.exists():
                tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=root))
                try:
                    make(tmp)
                    if not (tmp / "model.onnx").exists():
                        raise Unavailable("the exporter wrote no model.onnx")
                    os.replace(tmp, folder)
                except _Transient:
                    raise
                except Unavailable as exc:
                    _write_atomic(failed, str(exc))
                except Exception as exc:  # an exporter's own failure: recorded once, never retried for this key
                    _write_atomic(failed, f"export failed: {one_line(exc)}")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    if failed.exists():
        raise Unavailable(failed.read_text())
    return model


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first non-empty line of the message`, at most `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:limit]


@functools.lru_cache(maxsize=1)
def main_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")}


def genai_version() -> str:
    """onnxruntime-genai's version here (the `corpus` extra); `Unavailable` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        raise Unavailable("onnxruntime-genai is not installed: run `bash setup.sh` "
                          "(pip install -e '.[corpus]')") from None


@functools.lru_cache(maxsize=1)
def venv_versions() -> dict[str, str]:
    """Versions of the exporter venv's packages (one quick subprocess); `Unavailable` when the venv is missing."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise Unavailable(f"{VENV.name} is missing: run `bash setup.sh` (it makes the venv of Optimum)")
    installed = VENV / "requirements.installed"  # setup.sh's copy of VENV_REQUIREMENTS once the venv is made
    if not installed.exists() or installed.read_bytes() != VENV_REQUIREMENTS.read_bytes():
        raise Unavailable(f"{VENV.name} does not have the pins of {VENV_REQUIREMENTS.name}: run `bash setup.sh`")
    code = ("import json, importlib.metadata as m; print(json.dumps({d.metadata['Name'].lower(): d.version "
            "for d in m.distributions()}, sort_keys=True))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=VENV)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"{VENV.name} is broken ({tail}): run `bash setup.sh`")
    return json.loads(proc.stdout)


def _run_exporter(cmd: list[str], out: pathlib.Path, other_python: bool = False) -> subprocess.CompletedProcess:
    """Run an exporter's command in `out`, offline and quiet (`other_python`: the venv's interpreter, which must
    not see this environment's PYTHONPATH); running past EXPORT_TIMEOUT raises _TimedOut, and an interpreter that
    cannot start (a venv removed under a running test session) raises _Transient: neither is the exporter's failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    if other_python:
        env["TOKENIZERS_PARALLELISM"] = "false"
        env.pop("PYTHONPATH", None)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT, env=env, cwd=out)
    except subprocess.TimeoutExpired:
        raise _TimedOut(f"export failed: timed out after {EXPORT_TIMEOUT}s") from None
    except OSError as exc:
        raise _Transient(f"export failed: could not start {cmd[0]} ({exc.strerror or exc})") from None


def _output_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def _venv_export(arch: str, exporter: str, out: pathlib.Path) -> None:
    cmd = [str(VENV / "bin" / "python"), str(pathlib.Path(__file__).resolve()), "export", arch, exporter, str(out)]
    proc = _run_exporter(cmd, out, other_python=True)
    if proc.returncode:
        lines = _output_lines(proc)
        errors = [line for line in lines if line.startswith("corpus-worker-error: ")]
        reason = errors[-1][len("corpus-worker-error: "):] if errors else (lines[-1] if lines else f"exit {proc.returncode}")
        raise Unavailable(f"export failed: {reason}"[:300])


# ------------------------------------------------------------------------------------------------ torch models
# Everything below up to the helper graph runs in either environment (transformers 4.57 in the venv, 5.x here).

def build_torch(arch: str, dtype=None):
    """The seeded random-weight transformers model of `arch` (eval mode, fp32 unless `dtype`)."""
    import torch
    import transformers

    config_cls, model_cls, _, kwargs = ARCHS[arch]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(SEED)
    model = getattr(transformers, model_cls)(config)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norm gains and biases: not the library's exact 1 and 0
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model


def example_inputs(arch: str, batch: int = 2, seq: int = 8) -> dict[str, Any]:
    import torch

    kind = ARCHS[arch][2]
    gen = torch.Generator().manual_seed(SEED)
    if kind == "vision":
        c = ARCHS[arch][3]
        return {"pixel_values": torch.randn(batch, c["num_channels"], c["image_size"], c["image_size"], generator=gen)}
    vocab = ARCHS[arch][3]["vocab_size"]
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _wrappers():
    import torch

    class Logits(torch.nn.Module):
        """(input_ids [, attention_mask]) -> logits or last_hidden_state, without a cache."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

    class Pixels(torch.nn.Module):
        """pixel_values -> logits."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    class WithPast(torch.nn.Module):
        """(input_ids, attention_mask, k0, v0, k1, v1, ...) -> (logits, present k0, v0, ...) through a DynamicCache."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            from transformers import DynamicCache

            pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return Logits, Pixels, WithPast


def export_main(arch: str, exporter: str, target: pathlib.Path) -> None:
    """`torch.onnx.export` of `arch` as `exporter` says (dynamo18/23[-mask|-kv], torchscript, fp16) into `target`."""
    import warnings

    import torch
    from torch.export import Dim

    warnings.filterwarnings("ignore")
    kind = ARCHS[arch][2]
    model = build_torch(arch, torch.float16 if exporter == "fp16" else None)
    Logits, Pixels, WithPast = _wrappers()
    inputs = example_inputs(arch)
    if kind == "vision":
        names = ["pixel_values"]
    elif exporter.endswith("-mask") or exporter == "torchscript":
        names = ["input_ids", "attention_mask"]
    else:
        names = ["input_ids"]
    args = [inputs[n].half() if n == "pixel_values" and exporter == "fp16" else inputs[n] for n in names]
    out_name = {"decoder": "logits", "encoder": "last_hidden_state", "vision": "logits"}[kind]
    output_names = [out_name]
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=256)
    dyn: dict[str, Any] = {n: ({0: batch} if n == "pixel_values" else {0: batch, 1: seq}) for n in names}
    module = Pixels(model) if kind == "vision" else Logits(model)
    if exporter.endswith("-kv"):
        cfg = model.config
        layers = cfg.num_hidden_layers
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads  # GPT-2: no GQA
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        gen = torch.Generator().manual_seed(SEED)
        past_len, new = 6, 4
        past = [torch.randn(2, kv_heads, past_len, head_dim, generator=gen) for _ in range(2 * layers)]
        args = [inputs["input_ids"][:, :new], torch.ones(2, new + past_len, dtype=torch.int64), *past]
        kv_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        past_dim = Dim("past", min=1, max=256)
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim("total", min=2, max=512)},
               "past": tuple({0: batch, 2: past_dim} for _ in kv_names)}
        names = ["input_ids", "attention_mask", *kv_names]
        output_names = ["logits", *[n.replace("past_key_values", "present") for n in kv_names]]
        module = WithPast(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "torchscript":
        axes = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "seq"}) for n in names}
        axes[out_name] = {0: "batch"} if kind == "vision" else {0: "batch", 1: "seq"}
        torch.onnx.export(module, tuple(args), str(target), dynamo=False, opset_version=17, input_names=names,
                          output_names=output_names, dynamic_axes=axes)
        return
    opset = 23 if exporter.startswith("dynamo23") else 18
    program = torch.onnx.export(module, tuple(args), dynamo=True, opset_version=opset, input_names=names,
                                output_names=output_names, dynamic_shapes=dyn, verbose=False)
    program.save(str(target))


# ------------------------------------------------------------------------------------------------ torchvision

TORCHVISION_DIR = ROOT / ".torchvision"  # setup.sh: pip install --no-deps --target .torchvision torchvision==0.28.0


def torchvision_version() -> str:
    """The version of the torchvision in `TORCHVISION_DIR`; `Unavailable` when it is not there."""
    from importlib.metadata import distributions

    found = [d.version for d in distributions(path=[str(TORCHVISION_DIR)]) if d.metadata["Name"] == "torchvision"]
    if not found:
        raise Unavailable(f"torchvision is not in {TORCHVISION_DIR.name}: run `bash setup.sh`")
    return found[0]


def import_torchvision():
    """`import torchvision` from `TORCHVISION_DIR`, for its model definitions only.

    The torchvision wheel made for torch 2.13 (0.28.0) ships a CUDA build of its `_C` extension, which cannot load
    beside the CPU torch; `torchvision/_meta_registrations.py` then fails at import ("operator torchvision::nms does
    not exist") because it registers fake kernels for `_C`'s operators. The models need none of `_C` (it holds
    detection ops, nms and roi_align, and the video decoders), so an empty module stands in for
    `_meta_registrations` before the import. Installed in site-packages it would break `transformers`, which
    imports torchvision whenever it finds it (and then fails on every model class): so it lives in its own folder,
    which only this function puts on `sys.path`, after which transformers finds the module already imported. This is
    the only place that imports torchvision."""
    import types

    torchvision_version()
    if str(TORCHVISION_DIR) not in sys.path:
        sys.path.append(str(TORCHVISION_DIR))
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    return torchvision


def build_torchvision(name: str):
    """The seeded random-weight torchvision classifier `name` (eval mode), as `TORCHVISION` configures it. BatchNorm
    running statistics get seeded noise (mean 0 +- 0.1, variance 1 +- 10%) so that folding them is not a no-op, and
    weight matrices torchvision initializes to zeros (ViT's classifier head) get normal(0, 0.02) values: a zero head
    makes every output 0, and then no check of a rewrite can fail."""
    import torch

    tv = import_torchvision()
    torch.manual_seed(SEED)
    model = getattr(tv.models, name)(weights=None, **TORCHVISION[name][1])
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.add_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.mul_(1 + 0.1 * torch.rand(module.running_var.shape, generator=gen))
    return model.eval()


def export_torchvision(name: str, target: pathlib.Path) -> None:
    """`torch.onnx.export(dynamo=True)` at opset 18 of torchvision's `name`: pixel_values [batch, 3, R, R] ->
    logits [batch, 1000], dynamic batch."""
    import warnings

    import torch
    from torch.export import Dim

    warnings.filterwarnings("ignore")
    model = build_torchvision(name)
    res = TORCHVISION[name][0]
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(SEED))
    target.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, input_names=["pixel_values"],
                                output_names=["logits"], dynamic_shapes={"x": {0: Dim("batch", min=1, max=1024)}},
                                verbose=False)
    program.save(str(target))


# ------------------------------------------------------------------------------------------------ venv worker

def tiny_tokenizer(folder: pathlib.Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json without merges (<unk>=0, <s>=1, </s>=2, then the 256 bytes) and the
    tokenizer_config.json that makes `AutoTokenizer` load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "model_max_length": 256}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))


def save_hf(arch: str, folder: pathlib.Path) -> pathlib.Path:
    """A Hugging Face model folder of `arch` (config.json, safetensors weights, tokenizer files)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    model = build_torch(arch)
    model.save_pretrained(str(folder))
    if ARCHS[arch][2] != "vision":
        tiny_tokenizer(folder, ARCHS[arch][3]["vocab_size"])
    return folder


def _worker_export(arch: str, exporter: str, out: pathlib.Path) -> None:
    """In the venv: save the HF folder, run Optimum or the GenAI builder, leave `out/model.onnx` (+ its data)."""
    import warnings

    warnings.filterwarnings("ignore")
    hf = save_hf(arch, out / "_hf")
    kind = ARCHS[arch][2]
    if exporter.startswith("optimum"):
        task = OPTIMUM_TASKS[kind] + ("-with-past" if exporter == "optimum-past" else "")
        produced = out / "_optimum"
        cmd = [sys.executable, "-m", "optimum.exporters.onnx", "-m", str(hf), "--task", task, "--device", "cpu",
               "--library-name", "transformers", str(produced)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            raise RuntimeError(lines[-1] if lines else f"Optimum exited {proc.returncode}")
        for file in produced.iterdir():
            if file.suffix in (".onnx", ".onnx_data") or file.name.endswith(".onnx.data"):
                os.replace(file, out / file.name)
        if not (out / "model.onnx").exists():
            raise RuntimeError(f"Optimum wrote {sorted(p.name for p in produced.iterdir())}, no model.onnx")
    else:
        raise RuntimeError(f"unknown venv exporter {exporter}")
    for tmp in ("_hf", "_optimum"):
        shutil.rmtree(out / tmp, ignore_errors=True)


def genai_export(arch: str, exporter: str, out: pathlib.Path) -> None:
    """Here (transformers 5): save the HF folder, run the GenAI builder on it into `out` (model.onnx, its .data,
    genai_config.json, tokenizer files)."""
    hf = save_hf(arch, out / "_hf")
    precision = exporter.split("-")[1]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out / "_genai"),
           "-p", precision, "-e", "cpu", "-c", str(out / "_cache")]
    proc = _run_exporter(cmd, out)
    if proc.returncode:
        lines = _output_lines(proc)
        raise Unavailable(f"export failed: {lines[-1] if lines else f'the builder exited {proc.returncode}'}"[:300])
    for file in (out / "_genai").iterdir():
        os.replace(file, out / file.name)
    for tmp in ("_hf", "_genai", "_cache"):
        shutil.rmtree(out / tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ onnx.helper

def build_helper(target: pathlib.Path, vocab: int = 256, hidden: int = 64, heads: int = 4, ffn: int = 128,
                 layers: int = 2) -> pathlib.Path:
    """A decoder written with onnx.helper and no value_info: Gather embedding; per block LayerNorm, q/k/v MatMul +
    Add, 4-head attention (Reshape/Transpose, MatMul, Div, Softmax, MatMul), output MatMul, residual, LayerNorm,
    MatMul + Add, Relu, MatMul + Add, residual; final LayerNorm and an LM head MatMul. input_ids -> logits."""
    import numpy as np
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(SEED)
    inits: list = []

    def weight(name: str, *shape: int, std: float = 0.1, base: float = 0.0) -> str:
        inits.append(numpy_helper.from_array((base + rng.normal(0, std, shape)).astype(np.float32), name))
        return name

    def const(name: str, values) -> str:
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    mk = helper.make_node
    head = hidden // heads
    nodes = [mk("Gather", [weight("embed", vocab, hidden, std=0.5), "input_ids"], ["h0"])]
    split, merge = const("split_shape", [0, 0, heads, head]), const("merge_shape", [0, 0, hidden])
    scale = inits.append(numpy_helper.from_array(np.array(np.sqrt(head), np.float32), "scale")) or "scale"
    x = "h0"
    for i in range(layers):
        p = f"layers.{i}."
        nodes.append(mk("LayerNormalization", [x, weight(p + "ln1.weight", hidden, base=1), weight(p + "ln1.bias", hidden)],
                        [p + "n1"], axis=-1, epsilon=1e-5))
        for t in "qkv":
            nodes += [mk("MatMul", [p + "n1", weight(p + f"{t}_proj.weight", hidden, hidden)], [p + f"{t}0"]),
                      mk("Add", [p + f"{t}0", weight(p + f"{t}_proj.bias", hidden)], [p + f"{t}1"]),
                      mk("Reshape", [p + f"{t}1", split], [p + f"{t}2"]),
                      mk("Transpose", [p + f"{t}2"], [p + t], perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3])]
        nodes += [mk("MatMul", [p + "q", p + "k"], [p + "scores0"]), mk("Div", [p + "scores0", scale], [p + "scores"]),
                  mk("Softmax", [p + "scores"], [p + "probs"], axis=-1), mk("MatMul", [p + "probs", p + "v"], [p + "ctx0"]),
                  mk("Transpose", [p + "ctx0"], [p + "ctx1"], perm=[0, 2, 1, 3]),
                  mk("Reshape", [p + "ctx1", merge], [p + "ctx"]),
                  mk("MatMul", [p + "ctx", weight(p + "o_proj.weight", hidden, hidden)], [p + "attn"]),
                  mk("Add", [x, p + "attn"], [p + "h1"]),
                  mk("LayerNormalization", [p + "h1", weight(p + "ln2.weight", hidden, base=1),
                                            weight(p + "ln2.bias", hidden)], [p + "n2"], axis=-1, epsilon=1e-5),
                  mk("MatMul", [p + "n2", weight(p + "fc1.weight", hidden, ffn)], [p + "f0"]),
                  mk("Add", [p + "f0", weight(p + "fc1.bias", ffn)], [p + "f1"]), mk("Relu", [p + "f1"], [p + "f2"]),
                  mk("MatMul", [p + "f2", weight(p + "fc2.weight", ffn, hidden)], [p + "f3"]),
                  mk("Add", [p + "f3", weight(p + "fc2.bias", hidden)], [p + "f4"]),
                  mk("Add", [p + "h1", p + "f4"], [p + "out"])]
        x = p + "out"
    nodes += [mk("LayerNormalization", [x, weight("norm.weight", hidden, base=1), weight("norm.bias", hidden)], ["nf"],
                 axis=-1, epsilon=1e-5),
              mk("MatMul", ["nf", weight("lm_head.weight", hidden, vocab)], ["logits"])]
    graph = helper.make_graph(nodes, "helper_decoder",
                              [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", "seq", vocab])], inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", HELPER_OPSET)],
                              producer_name="onnx.helper")
    assert not model.graph.value_info
    onnx.checker.check_model(model, full_check=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


# ------------------------------------------------------------------------------------------------ the pass matrix

# Options for passes that need some (the rest run with their defaults).
# heal's 10 steps (default 100) still train, verify and save; what heal reaches is benchmarks/heal.py's question.
PASS_OPTIONS = {"drop-blocks": "n=1", "prune": "ratio=0.25", "heal": "steps=10"}


def pass_spec(name: str) -> str:
    opts = PASS_OPTIONS.get(name)
    return f"{name}({opts})" if opts else name


QUANTIZERS = ("quant4", "quant8", "spquant", "eora")
BLOCK_PASSES = ("slice", "drop-blocks", "share", "lowrank")


def required_passes(entry: Entry) -> set[str]:
    """The passes that must verify on `entry` (issue 15's contract; tests/test_corpus.py holds the recorded matrix to
    it): every quantizer and prune on every model; slice, drop-blocks, share and lowrank on every pre-norm decoder from
    every exporter. ONNX Runtime GenAI's int4 graphs are the one exception: their projections are already 4-bit
    MatMulNBits, whose float weights slice (through fold-norms) and share would have to rewrite, so those two refuse
    with that reason; drop-blocks and lowrank must still verify there."""
    kind = ARCHS[entry.arch][2] if entry.arch in ARCHS else ("decoder" if entry.arch == "helper" else "vision")
    out = {*QUANTIZERS, "prune"}
    if kind == "decoder":
        out |= set(BLOCK_PASSES) - ({"slice", "share"} if entry.exporter == "genai-int4" else set())
    return out


def pass_names() -> list[str]:
    """The shipped passes (those of modelsurgeon.passes), not ones a host program or a test registered."""
    from modelsurgeon.pass_api import registered_passes

    return [name for name, cls in registered_passes().items() if cls.__module__.startswith("modelsurgeon.passes.")]


@dataclasses.dataclass
class Outcome:
    """How one pass ended on one model. status: "verified" (compiled, verified by the pass manager, and the saved
    file loads in ONNX Runtime), "refused" (a `UserError`: one line), "broken" (a `VerificationError`: the pass
    produced a model that failed its checks), "internal error" (any other exception), "unavailable" (no model)."""

    status: str
    detail: str = ""
    rel_l2: float | None = None
    max_abs: float | None = None
    seconds: float = 0.0
    modified: bool | None = None  # verified cells: whether the pass changed the model (False: it found nothing to do)

    def expectation(self) -> str:
        """The line kept in models/corpus_expected.json: "verified", "refused: <line>", "internal error: <line>"."""
        return self.status if self.status == "verified" else f"{self.status}: {self.detail}"


BAD = ("broken", "internal error")  # statuses that are bugs: the engineers' to fix


def run_cell(model_path: pathlib.Path | str, spec: str, num_samples: int | None = None) -> Outcome:
    """Compile `model_path` through `spec` (calibration synthesized by the compile defaults unless `num_samples`),
    save the result and load it in ONNX Runtime. The default `fuse` is not appended: each cell is its pass alone, and
    `fuse` has a column of its own."""
    import logging

    import modelsurgeon
    from modelsurgeon.errors import UserError, VerificationError
    from modelsurgeon.runtime.session import make_session

    logging.getLogger("modelsurgeon").setLevel(logging.ERROR)
    start = time.perf_counter()
    kwargs = {} if num_samples is None else {"num_samples": num_samples}
    try:
        result = modelsurgeon.compile(str(model_path), spec, progress=False, fuse=False, **kwargs)
        with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
            out = result.save(pathlib.Path(tmp) / "out.onnx")
            try:
                make_session(str(out))
            except Exception as exc:  # noqa: BLE001 - the file the compile wrote does not load
                raise RuntimeError(f"the saved model does not load in ONNX Runtime: {one_line(exc)}") from exc
        row = result.report.rows[-1]
        name = spec.split("(", 1)[0].strip()
        own = [r for r in result.report.rows[1:] if r.name.split("(", 1)[0] == name]
        modified = bool(own[-1].modified) if own else None
        return Outcome("verified", "", row.rel_l2, row.max_abs, time.perf_counter() - start, modified)
    except VerificationError as exc:
        return Outcome("broken", _first_line(exc), seconds=time.perf_counter() - start)
    except UserError as exc:
        return Outcome("refused", _first_line(exc), seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - everything else is an internal error, recorded as such
        return Outcome("internal error", one_line(exc), seconds=time.perf_counter() - start)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def matrix(models: list[Entry] | None = None, passes: list[str] | None = None, progress=None,
           num_samples: int | None = None) -> dict[str, dict[str, Any]]:
    """{model name: {"export": "ok" | "unavailable: ...", "seconds": export seconds, "cells": {pass: Outcome}}}."""
    models = entries() if models is None else models
    passes = pass_names() if passes is None else passes
    table: dict[str, dict[str, Any]] = {}
    for e in models:
        start = time.perf_counter()
        try:
            path = e.path()
        except Unavailable as exc:
            table[e.name] = {"export": f"unavailable: {exc}", "seconds": time.perf_counter() - start, "cells": {}}
            if progress:
                progress(e.name, None, None)
            continue
        row = {"export": "ok", "seconds": time.perf_counter() - start, "cells": {}}
        table[e.name] = row
        for name in passes:
            outcome = run_cell(path, pass_spec(name), num_samples=num_samples)
            row["cells"][name] = outcome
            if progress:
                progress(e.name, name, outcome)
    return table


# ------------------------------------------------------------------------------------------------ script

def _main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "export":  # the venv worker
        try:
            _worker_export(argv[1], argv[2], pathlib.Path(argv[3]))
        except Exception as exc:  # noqa: BLE001 - reported to the parent in one line
            print(f"corpus-worker-error: {one_line(exc)}", flush=True)
            raise
        return 0
    if len(argv) == 1 and argv[0] == "list":
        for e in entries():
            print(e.name)
        return 0
    print("usage: corpus.py list | corpus.py export ARCH EXPORTER OUT_FOLDER (run by the venv's python)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
