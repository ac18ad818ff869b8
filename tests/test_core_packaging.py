"""Packaging: one import package `modelsurgeon`, no top-level `compiler`/`runtime`, a console script."""

import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_subpackages_map_to_the_design_folders():
    import modelsurgeon
    import modelsurgeon.models
    import modelsurgeon.passes
    import modelsurgeon.runtime

    assert pathlib.Path(modelsurgeon.__file__).parent.name == "compiler"
    assert pathlib.Path(modelsurgeon.passes.__file__).parent.name == "passes"
    assert pathlib.Path(modelsurgeon.runtime.__file__).parent.name == "runtime"
    assert pathlib.Path(modelsurgeon.models.__file__).parent.name == "models"


def test_console_script_declared():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "modelsurgeon" and ep.value == "modelsurgeon.cli:main" for ep in eps)


@pytest.mark.slow
def test_wheel_ships_only_the_modelsurgeon_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", "_build", ".cache", ".venv*"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "w", src],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "MODELSURGEON_SKIP_KERNELS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "w").glob("modelsurgeon-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("modelsurgeon-")}
    assert tops == {"modelsurgeon"}, tops
    for sub in ("modelsurgeon/__init__.py", "modelsurgeon/cli.py", "modelsurgeon/passes/__init__.py",
                "modelsurgeon/runtime/__init__.py", "modelsurgeon/models/__init__.py", "modelsurgeon/analyses/__init__.py"):
        assert sub in names, sub
