"""Every third-party import of the package is a core dependency, or refuses in one line that names its extra.

Two checks: a static one over the sources (the rule below), and a run of every pass and command in .venv-core, the
venv setup.sh makes with only the core dependencies and the test extra (tests/core_env_check.py), which catches what
the static one cannot see (an import made by name, a dependency that only a dependency's extra brings).

The rule for compiler/, passes/ and runtime/: an imported top-level module is the standard library, modelsurgeon,
a distribution in pyproject.toml's `dependencies`, or sits in the body of a `try` whose `except ImportError`
raises UserError naming `pip install 'modelsurgeon[EXTRA]'` for an extra that lists that distribution. models/
(the real-model loaders; the CLI never imports them) may import the extras' distributions and the packaged models
setup.sh installs, inside functions only: at module level it too imports core dependencies only.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("compiler", "passes", "runtime")
VENV_PYTHON = ROOT / ".venv-core" / "bin" / "python"


@functools.cache
def _check_script():
    spec = importlib.util.spec_from_file_location("core_env_check", ROOT / "tests" / "core_env_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return normalize(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])


@functools.cache
def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, extra -> its distributions), normalized, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {extra: {requirement_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    return {requirement_name(r) for r in project["dependencies"]}, extras


def distribution_of(module: str) -> str:
    """The installed distribution that provides a top-level module; the module's own name when none does."""
    return normalize(_distributions().get(module, [module])[0])


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _under_type_checking(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _in_function(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def _guard_extras(node, parents) -> set[str]:
    """Extras named by the `except ImportError: raise UserError(... modelsurgeon[EXTRA] ...)` around an import."""
    named: set[str] = set()
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                caught = ast.unparse(handler.type) if handler.type is not None else ""
                raises = [n for n in ast.walk(handler) if isinstance(n, ast.Raise) and n.exc is not None]
                if re.search(r"\b(ImportError|ModuleNotFoundError)\b", caught) and any(
                        "UserError" in ast.unparse(r.exc) for r in raises):
                    named |= set(re.findall(r"pip install 'modelsurgeon\[(\w+)\]'", ast.unparse(handler)))
        child = parent
    return named


# Distributions setup.sh installs into a folder of their own, which only a models/ loader puts on sys.path:
# torchvision (`pip install --no-deps --target .torchvision`; see models/corpus.py `import_torchvision`).
OWN_FOLDER = {"torchvision"}


def undeclared_imports(source: str, where: str, *, loaders: bool = False) -> list[str]:
    """What in `source` breaks the rule above (loaders=True: models/'s rule); each as `where:line: why`."""
    core, extras = declared()
    packaged = {normalize(m) for m in _check_script().PACKAGED_MODELS} | OWN_FOLDER
    tree = ast.parse(source)
    parents = _parents(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("modelsurgeon", "__future__"):
                continue
            if _under_type_checking(node, parents):
                continue
            dist = distribution_of(top)
            if dist in core:
                continue
            at = f"{where}:{node.lineno}: {module} ({dist})"
            if loaders:
                if not _in_function(node, parents):
                    problems.append(f"{at} is imported at module level but is not a core dependency")
                elif not any(dist in names for names in extras.values()) and dist not in packaged:
                    problems.append(f"{at} is in no extra of pyproject.toml")
                continue
            guards = _guard_extras(node, parents)
            if not any(dist in extras.get(extra, ()) for extra in guards):
                problems.append(f"{at} is not a core dependency in pyproject.toml, and no `except ImportError` around "
                                f"it raises UserError naming `pip install 'modelsurgeon[EXTRA]'` for an extra that has it")
    return problems


def test_every_import_is_declared_or_refuses_naming_its_extra():
    problems = []
    for folder in PACKAGE_DIRS + ("models",):
        for path in sorted((ROOT / folder).rglob("*.py")):
            problems += undeclared_imports(path.read_text(), str(path.relative_to(ROOT)), loaders=folder == "models")
    assert not problems, "\n".join(problems)


GUARDED = '''
def plot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'modelsurgeon[plot]'") from None
'''


def test_the_rule_refuses_an_undeclared_import():
    assert undeclared_imports("import numpy\nimport scipy.linalg\nfrom onnx import helper\nimport json\n", "ok.py") == []
    assert undeclared_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sklearn\n", "ok.py") == []
    assert undeclared_imports(GUARDED, "ok.py") == []
    for bad in ("import sklearn\n", "def run():\n    from sklearn.linear_model import Ridge\n",
                "def plot():\n    import matplotlib\n",  # in an extra, but nothing refuses without it
                GUARDED.replace("import matplotlib", "import transformers")):  # the extra named does not have it
        assert undeclared_imports(bad, "passes/new.py"), bad
    assert undeclared_imports("import transformers\n", "models/x.py", loaders=True)  # module level
    assert undeclared_imports("def f():\n    import sklearn\n", "models/x.py", loaders=True)  # in no extra
    assert undeclared_imports("def f():\n    import transformers\n", "models/x.py", loaders=True) == []


def test_every_pass_runs_with_only_the_core_dependencies():
    if not VENV_PYTHON.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VENV_PYTHON} is missing: setup.sh makes it, and CI runs setup.sh")
        pytest.skip(f"no core-dependency venv at {VENV_PYTHON}: run `bash setup.sh` to make it")
    stamp = ROOT / ".venv-core" / "pyproject.toml.installed"
    if not stamp.exists() or stamp.read_text() != (ROOT / "pyproject.toml").read_text():
        pytest.fail("pyproject.toml changed since .venv-core was made: rerun `bash setup.sh`")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([str(VENV_PYTHON), str(ROOT / "tests" / "core_env_check.py"), "--core-only"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_sweep_plot_without_matplotlib_names_the_plot_extra(monkeypatch, tmp_path):
    from modelsurgeon.errors import UserError
    from modelsurgeon.sweep import SweepResult, plot_sweep

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(UserError, match=r"^the sweep plot needs matplotlib.*pip install 'modelsurgeon\[plot\]'$"):
        plot_sweep(SweepResult([], "perplexity", False, "lm", "m.onnx"), tmp_path / "sweep.png")
