"""Start-up: the light commands import no heavy module (torch alone costs a second of CPU before anything happens).

Heavy modules are imported inside the functions that use them; `modelsurgeon passes` and `modelsurgeon inspect`
need none of them. Checked in a fresh interpreter, since this one has imported everything already.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "scipy", "matplotlib", "onnxscript", "onnxruntime", "tokenizers")

_RUN = """
import contextlib, io, json, sys
from modelsurgeon.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps([code, sorted({name.split(".")[0] for name in sys.modules})]))
"""


def imported_by(*argv) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", _RUN, *map(str, argv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code, modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert code == 0, proc.stderr
    return set(modules)


@pytest.mark.parametrize("command", [("passes",), ("inspect", "MODEL"), ("inspect", "MODEL", "--groups")])
def test_light_commands_import_no_heavy_module(command, reference_onnx):
    argv = [reference_onnx("llama") if a == "MODEL" else a for a in command]
    assert imported_by(*argv) & set(HEAVY) == set()
