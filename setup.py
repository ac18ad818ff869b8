"""Build hook: compiles the optional ONNX Runtime custom-op library (runtime/kernels/) during installation.

All metadata lives in pyproject.toml; this file only adds a build_py step. The library is an optional
extension: when it cannot be built (no g++, no network for the ORT headers, ...) installation still
succeeds and models run the ONNX-function fallback. Set MODELSURGEON_SKIP_KERNELS=1 to skip it.
"""

import importlib.util
import os
import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


def _build_custom_ops():
    if os.environ.get("MODELSURGEON_SKIP_KERNELS", "").strip() in ("1", "true", "yes"):
        return None
    try:
        spec = importlib.util.spec_from_file_location("_modelsurgeon_custom_ops", ROOT / "runtime" / "custom_ops.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        path = module.build()
        print(f"modelsurgeon: custom ops {'built: ' + str(path) if path else 'not built (ONNX-function fallback); see runtime/kernels/_build/build.log'}")
        return path
    except Exception as exc:  # never fail the installation
        print(f"modelsurgeon: custom ops not built: {exc!r}")
        return None


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        library = _build_custom_ops()
        if library and not getattr(self, "editable_mode", False):  # wheels carry a copy; editable installs use the tree
            target = pathlib.Path(self.build_lib) / "modelsurgeon" / "runtime" / "kernels" / "_build"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library, target / pathlib.Path(library).name)


setup(cmdclass={"build_py": BuildPyWithKernels})
