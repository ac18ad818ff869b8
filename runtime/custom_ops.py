"""Our ONNX Runtime custom-operator library (`ai.modelsurgeon::SparseQuantMatMul`): find it, build it, say which path ran.

The C++ sources live in `runtime/kernels/`. The library is built when the project is installed (setup.py calls
`build()`; failures are swallowed there) or by hand with `python -m modelsurgeon.runtime.custom_ops build`. It
needs g++ and the ONNX Runtime C API headers, which `kernels/fetch_ort_headers.sh` takes from Debian's
libonnxruntime-dev into `kernels/_build/ort-headers` (never committed). The library does not link
libonnxruntime; it asks the loading ORT for C API version 17, so it loads on ONNX Runtime 1.17 to current.

When the library is missing (or `MODELSURGEON_NO_CUSTOM_OPS=1`), models still run: every model that uses the op
carries an ONNX function of the same domain and name (`runtime/sparse_quant_function.py`) that ORT inlines.
`session_path(session)` tells which of the two a session made by `make_session` uses.

Only the standard library is imported here: setup.py loads this file by path, before dependencies exist.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

KERNEL_DIR = pathlib.Path(__file__).resolve().parent / "kernels"
BUILD_DIR = KERNEL_DIR / "_build"
LIBRARY_NAME = "libmodelsurgeon_ops.so"
DOMAIN = "ai.modelsurgeon"
ENV_DISABLE = "MODELSURGEON_NO_CUSTOM_OPS"  # "1": never register the library (ONNX-function fallback)
ENV_LIBRARY = "MODELSURGEON_CUSTOM_OPS_LIB"  # explicit path of a built library
SESSION_CONFIG_KEY = "modelsurgeon.custom_ops_library"  # set by runtime.session.make_session

# Translation units and the extra flags each is compiled with (the ISA paths are chosen at run time).
SOURCES = {
    "sqmm_scalar.cc": [],
    "sqmm_avx2.cc": ["-mavx2", "-mfma", "-mf16c"],
    "sqmm_avx512.cc": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "custom_op.cc": [],
}
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-maybe-uninitialized"]
LDFLAGS = ["-shared", "-Wl,-z,defs", "-Wl,--exclude-libs,ALL", "-static-libstdc++", "-static-libgcc"]


def _enabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("1", "true", "yes", "on")


def built_library() -> pathlib.Path | None:
    """The built library file, whether or not it is enabled."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        return pathlib.Path(explicit) if pathlib.Path(explicit).is_file() else None
    path = BUILD_DIR / LIBRARY_NAME
    return path if path.is_file() else None


def library_path() -> str | None:
    """Path of the custom-op library to register in ORT sessions, or None (models then use the ONNX function)."""
    if not _enabled():
        return None
    path = built_library()
    return str(path) if path else None


def kernel_info() -> dict | None:
    """Build facts of the library (op, ORT API version, the CPU code path it picks here), or None when not built."""
    path = built_library()
    if path is None:
        return None
    import ctypes

    lib = ctypes.CDLL(str(path))
    lib.msops_build_info.restype = ctypes.c_char_p
    return json.loads(lib.msops_build_info().decode())


def session_path(session) -> str:
    """'kernel' when the session registered our library (ORT then runs the native kernel for our ops), else
    'function' (ORT inlines the ONNX function every such model carries). For sessions from `make_session`, which
    records the registered library in the session's options."""
    try:
        path = session.get_session_options().get_session_config_entry(SESSION_CONFIG_KEY)
    except Exception:  # key absent: no library registered
        return "function"
    return "kernel" if path else "function"


def uses_custom_ops(model) -> bool:
    """Whether an onnx_ir model has nodes of our domain."""
    return any(node.domain == DOMAIN for node in model.graph.all_nodes())


# ---------------------------------------------------------------- building


def fetch_headers(log=None) -> pathlib.Path | None:
    """ONNX Runtime C API headers: $ORT_INCLUDE_DIR, the build cache, /usr/include/onnxruntime, else fetch them."""
    candidates = [os.environ.get("ORT_INCLUDE_DIR"), str(BUILD_DIR / "ort-headers"), "/usr/include/onnxruntime"]
    for cand in candidates:
        if cand and (pathlib.Path(cand) / "onnxruntime_c_api.h").is_file():
            return pathlib.Path(cand)
    script = KERNEL_DIR / "fetch_ort_headers.sh"
    proc = subprocess.run(["bash", str(script), str(BUILD_DIR / "ort-headers")], capture_output=True, text=True, timeout=600)
    if log:
        log(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return None
    dest = BUILD_DIR / "ort-headers"
    return dest if (dest / "onnxruntime_c_api.h").is_file() else None


def build(force: bool = False, verbose: bool = False, cxx: str | None = None) -> pathlib.Path | None:
    """Compile the library into kernels/_build/. Returns its path, or None when it cannot be built (reason logged)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    log_path = BUILD_DIR / "build.log"
    lines: list[str] = []

    def log(text: str) -> None:
        lines.append(text)
        if verbose:
            print(text, file=sys.stderr)

    try:
        target = BUILD_DIR / LIBRARY_NAME
        sources = [KERNEL_DIR / name for name in SOURCES] + sorted(KERNEL_DIR.glob("*.h"))
        if not force and target.is_file() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources):
            log(f"up to date: {target}")
            return target
        cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not cxx:
            log("no C++ compiler (g++) found")
            return None
        headers = fetch_headers(log)
        if headers is None:
            log("ONNX Runtime headers not found and could not be fetched")
            return None
        with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
            objects = []
            for name, flags in SOURCES.items():
                obj = pathlib.Path(tmp) / (name + ".o")
                cmd = [cxx, *CXXFLAGS, *flags, f"-I{headers}", "-c", str(KERNEL_DIR / name), "-o", str(obj)]
                log(" ".join(cmd))
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    log(proc.stderr)
                    return None
                objects.append(str(obj))
            staged = pathlib.Path(tmp) / LIBRARY_NAME
            cmd = [cxx, *LDFLAGS, "-o", str(staged), *objects]
            log(" ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log(proc.stderr)
                return None
            os.replace(staged, target)  # atomic: a running process never sees half a library
        log(f"built {target}")
        return target
    except Exception as exc:  # an optional extension: never fail the caller
        log(f"build failed: {exc!r}")
        return None
    finally:
        try:
            log_path.write_text("\n".join(lines) + "\n")
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["build"]:
        path = build(force="--force" in args, verbose=True)
        print(path if path else "custom ops not built (see runtime/kernels/_build/build.log)")
        return 0 if path else 1
    print(json.dumps({"library": library_path(), "info": kernel_info()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
