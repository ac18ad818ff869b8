"""modelsurgeon: a graph-rewriting compiler for compressed ONNX models.

    import modelsurgeon
    result = modelsurgeon.compile("model.onnx", passes="slice(sparsity=0.25),quant4")
    result.save("out.onnx"); print(result.report.table())
"""

from modelsurgeon.errors import UserError, VerificationError
from modelsurgeon.manager import CompileResult, compile
from modelsurgeon.model_io import from_torch, load, save
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass, registered_passes

__version__ = "0.1.0"
__all__ = ["compile", "CompileResult", "load", "save", "from_torch", "Pass", "PassResult", "Option", "Stage",
           "register_pass", "registered_passes", "UserError", "VerificationError"]
