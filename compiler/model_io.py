"""Loading and saving models: ONNX files (external data included) and torch modules lowered to ONNX.

Everything here produces or consumes an `onnx_ir.Model`. Saving is atomic (a temporary folder beside the
output, then renames) and never writes over the input model.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import onnx_ir as ir

from modelsurgeon.errors import UserError
from modelsurgeon.input_dims import SOURCE_PATH
from modelsurgeon.write_targets import check_targets, data_file_of, protected_files

# Domains ONNX Runtime's stock CPU/CUDA builds know, plus our own custom-op domain.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
                 "com.ms.internal.nhwc", "ai.modelsurgeon", "pkg.onnxscript.torch_lib.common"}
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)
SMALL_TENSOR_BYTES = 64 * 1024  # external tensors under this are read into memory on load


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into the IR, checking that it is ONNX and that its external data is present.

    A GenAI or Optimum decoder folder loads its model file, with the folder kept in `model.meta[model_folder.FOLDER]`
    (a compile of it saves a folder of the same kind); any other folder is refused."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; give the path of an .onnx model")
    if path.is_dir():
        from modelsurgeon import model_folder

        folder = model_folder.open_folder(path)
        model = load(folder.model_file)
        model.meta[model_folder.FOLDER] = folder
        return model
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf DecodeError, truncated files, text files...
        raise UserError(f"{path}: not a valid ONNX model ({type(exc).__name__}); re-export it or check the file is complete") from exc
    if len(model.graph) == 0 and not model.graph.outputs:
        raise UserError(f"{path}: not a valid ONNX model (no graph); re-export it or check the file is complete")
    _check_external_data(model, path)
    check_domains(model, path.name)
    # Large external tensors stay where they are, read through memory maps when a pass or a session needs them:
    # sessions take the mapped arrays in place (runtime/detached_weights.py), saving streams untouched tensors into
    # the output's own data file, and no output may be written over a file the model reads (write_targets.py).
    # Small ones (shapes, axes: exporters with a zero threshold put them there too) are read now, since shape
    # inference in ONNX Runtime and in onnx cannot read external data.
    _read_small_external(model)
    model.meta[SOURCE_PATH] = str(path)  # its folder's configs size the dims the graph leaves symbolic
    return model


def _read_small_external(model: ir.Model) -> None:
    values = [v for g in model.graphs() for v in g.initializers.values()
              if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes < SMALL_TENSOR_BYTES]
    for value, tensor in zip(values, ir.external_data.convert_tensors_from_external([v.const_value for v in values])):
        value.const_value = tensor


def _check_external_data(model: ir.Model, path: pathlib.Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data_path = pathlib.Path(tensor.base_dir) / tensor.location
            if not data_path.exists():
                raise UserError(
                    f"{path}: external data file '{tensor.location}' (for initializer '{value.name}') is missing; "
                    f"put it next to the model in {path.parent or '.'}"
                )
            if data_path.stat().st_size < tensor.offset + tensor.length if tensor.offset is not None and tensor.length is not None else False:
                raise UserError(f"{path}: external data file '{tensor.location}' is truncated; copy it again")


def check_domains(model: ir.Model, what: str = "model") -> None:
    """Refuse models using op domains that ONNX Runtime cannot run and that no local function defines."""
    local = {f.domain for f in model.functions.values()}
    unknown: dict[str, list[str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            unknown.setdefault(node.domain, []).append(node.op_type)
    if unknown:
        domain, ops = next(iter(unknown.items()))
        raise UserError(
            f"{what}: ops from unknown domain '{domain}' ({', '.join(sorted(set(ops))[:5])}); "
            "ONNX Runtime cannot run them: export the model without custom ops or inline their functions"
        )


def model_bytes(model: ir.Model) -> int:
    """Bytes of tensor data in the model (initializers), the bulk of its size on disk."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None = None,
                      report: str | os.PathLike | None = None, reads: Sequence[str | os.PathLike] = ()) -> pathlib.Path:
    """Fail early (before any work) when the output, its data file or the report cannot be written safely.

    See write_targets.py: nothing may resolve to the input model, a data file it reads, or a file in `reads`."""
    out = pathlib.Path(output)
    targets = [(out, "output"), (data_file_of(out), "output's data file")]
    if report is not None:
        targets.append((pathlib.Path(report), "report"))
    check_targets(targets, protected_files(input_path, reads))
    return out


def external_files(model: ir.Model) -> list[pathlib.Path]:
    """The data files the model's tensors are still read from."""
    return sorted({pathlib.Path(v.const_value.path) for g in model.graphs() for v in g.initializers.values()
                   if isinstance(v.const_value, ir.ExternalTensor)})


def save(model: ir.Model, output: str | os.PathLike, *, external_data: bool | None = None,
         input_path: str | os.PathLike | None = None) -> pathlib.Path:
    """Save atomically, self-contained: the output references only the data file written with it.

    External data (`<name>.data`) is used when asked, when tensors exceed 1.5 GB, or when the model still reads
    tensors from another file (the input's): those are streamed into the output's own data file, never left
    as references that break once the output is moved."""
    reads = external_files(model)
    out = check_output_path(output, input_path, reads=reads)
    if external_data is None:
        external_data = model_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(reads)
    data_name = data_file_of(out).name
    tmpdir = tempfile.mkdtemp(prefix=".modelsurgeon-", dir=out.parent if str(out.parent) else ".")
    try:
        tmp_model = pathlib.Path(tmpdir) / out.name
        try:
            if external_data:
                # 64 KiB-aligned large tensors let ONNX Runtime map them from the file instead of copying them
                ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024, alignment=65536)
            else:
                ir.save(model, tmp_model)
        except OSError as exc:
            raise UserError(f"{out}: could not write ({exc.strerror}); free disk space or choose another path") from exc
        except ValueError as exc:
            if "2GB" in str(exc) or "2 GB" in str(exc) or "protobuf" in str(exc).lower():
                raise UserError(f"{out}: model exceeds the 2 GB protobuf limit; save with external data") from exc
            raise
        if external_data:
            os.replace(pathlib.Path(tmpdir) / data_name, data_file_of(out))
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def from_torch(module: Any, example_inputs: tuple | dict, *, opset: int = 18, input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None, dynamic_shapes: Any = None, optimize: bool = True) -> ir.Model:
    """Lower a torch.nn.Module, torch.fx.GraphModule or ExportedProgram to the IR via torch.onnx.export(dynamo=True)."""
    import torch

    if not isinstance(module, (torch.nn.Module, torch.export.ExportedProgram)):
        raise UserError(f"cannot lower a {type(module).__name__}: give a torch.nn.Module, torch.fx.GraphModule or ExportedProgram")
    kwargs = {}
    args = example_inputs
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    elif not isinstance(example_inputs, tuple):
        args = (example_inputs,)
    if isinstance(module, torch.nn.Module):
        module = module.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module, args, kwargs=kwargs or None, dynamo=True, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=optimize, verbose=False,
        )
    return program.model


def constant_weights(model: ir.Model) -> int:
    """Make initializers that are also graph inputs plain constants; returns how many.

    Graphs written before IR version 4 list every initializer as a graph input too (the ONNX wheel's zoo graphs
    list their biases so), which makes it a default value a caller could override: no pass may then treat the
    weight as a constant, and the quantizers left such layers alone. Nobody feeds a model its weights: the compile
    drops them from the inputs (ONNX Runtime's own advice, `remove_initializer_from_input`) and raises the IR version
    to 4, the first that allows an initializer that is not an input."""
    inputs = list(model.graph.inputs)
    kept = [v for v in inputs if v.name not in model.graph.initializers]
    if len(kept) < len(inputs):
        model.graph.inputs.clear()
        model.graph.inputs.extend(kept)
        model.ir_version = max(model.ir_version or 0, 4)  # IR 3 requires every initializer to be an input
    return len(inputs) - len(kept)


def as_model(model: Any, example_inputs: Any = None, **export_kwargs) -> ir.Model:
    """Accept a path, an onnx.ModelProto, an ir.Model, or a torch module (with example inputs)."""
    import onnx

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if example_inputs is None:
        raise UserError("lowering a torch model needs example inputs: pass example_inputs=(tensor, ...)")
    return from_torch(model, example_inputs, **export_kwargs)
