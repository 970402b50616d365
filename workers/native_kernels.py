"""Builds and loads the engine's CPU kernels with the system's C++ compiler: paged attention
(`attention/cpu_kernels.cpp`), the fused element-wise parts of a layer (`layers/cpu_dense_kernels.cpp`)
and the float32 linear layers for AVX2 CPUs (`layers/cpu_linear_kernels.cpp`), one library from all
three, so that they load, or fall back, together.

The library is plain C++ with OpenMP and no PyTorch headers, so it compiles in a few seconds (a
PyTorch extension spends most of a minute on its headers) and is called through ctypes with raw
pointers. It links the same `libgomp.so.1` that PyTorch has already loaded, so the kernels share
PyTorch's OpenMP threads instead of starting a second team that fights it for the cores. Builds are
cached per source, compiler and CPU under the user's cache folder; a machine without a compiler
gets `None` and one warning, and the engine falls back to the reference backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = (HERE / "attention" / "cpu_kernels.cpp", HERE / "layers" / "cpu_dense_kernels.cpp",
           HERE / "layers" / "cpu_linear_kernels.cpp")
HEADERS = (HERE / "bfloat16.h",)
# Fast math lets gcc vectorize exp (glibc's vector math library declares its vector variants only
# under -ffast-math) and the max/sum reductions; the kernels use no infinities (masked scores and
# the running max start at -1e30, whose exp underflows to 0). It is given to the compile step
# only: linked with it, gcc adds a start-up file that switches the whole process to flush-to-zero,
# which would change PyTorch's float results too (a test checks that it does not).
COMPILE_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-std=c++17",
                 "-ffast-math", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "write_kv": [_ptr, _i64, _ptr, _i64, _i32, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i32, _i64, _i32, _i32, _i32,
                 _i32],
    "paged_attention": [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i32, _i32, _i32, _i32, _i32,
                        _i64, _f32, _ptr, _ptr, _i32, _ptr, _ptr, _i32, _i32, _i32],
    "rms_norm": [_ptr, _i64, _ptr, _ptr, _f32, _i64, _i64, _ptr, _i32],
    "rotary": [_ptr, _i64, _i64, _i32, _i32, _ptr, _ptr, _ptr, _i32],
    "silu_and_mul": [_ptr, _i64, _i64, _ptr, _i32],
    "matrix_tiles_used": [_i32, _i32],
    "pairs_layout_used": [_i32, _i32],
    "first_max_rows": [_ptr, _i64, _i64, _ptr, _ptr, _i32],
    "linear_kernel_used": [],
    "packed_linear_size": [_i64, _i64],
    "pack_linear": [_ptr, _i64, _i64, _ptr],
    "pack_linear_bf16": [_ptr, _i64, _i64, _ptr],
    "linear_f32": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr],
    "linear_bf16_weights": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr],
    "pair_linear_used": [],
    "pack_pair_linear": [_ptr, _i64, _i64, _ptr],
    "linear_bf16": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr],
}
RETURNS = {"matrix_tiles_used": _i32, "pairs_layout_used": _i32, "linear_kernel_used": _i32, "packed_linear_size": _i64,
           "pair_linear_used": _i32}  # the others return nothing


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-batch-pipeline" / "kernels"


def load_cpu_kernels() -> ctypes.CDLL | None:
    """The kernels library, built on first use; None (with one warning) when it cannot be built."""
    with _lock:
        wanted = os.environ.get("CXX")
        compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
        key = str(compiler)
        if key not in _loaded:
            _loaded[key] = _build_and_load(compiler)
        return _loaded[key]


def _build_and_load(compiler: str | None) -> ctypes.CDLL | None:
    if compiler is None:
        warnings.warn("no C++ compiler found (g++, or set CXX): the CPU kernels cannot be built, so the engine "
                      "uses its slower PyTorch-only path (the reference attention backend)", RuntimeWarning,
                      stacklevel=4)
        return None
    import torch  # noqa: F401  (loads PyTorch's libgomp first, so the library binds to the same one)

    target = cache_folder() / f"cpu_kernels-{_build_key(compiler)}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
            for source, obj in zip(SOURCES, objects):
                result = subprocess.run([compiler, *COMPILE_FLAGS, str(source), "-o", str(obj)], capture_output=True,
                                        text=True)
                if result.returncode != 0:
                    break
            else:
                result = subprocess.run([compiler, *LINK_FLAGS, *map(str, objects), "-o", str(built), "-lmvec", "-lm"],
                                        capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn(f"building the CPU kernels with {compiler} failed, so the engine uses its slower "
                              f"PyTorch-only path (the reference attention backend):\n{result.stderr[-2000:]}",
                              RuntimeWarning, stacklevel=4)
                return None
            os.replace(built, target)  # atomic: a concurrent builder's copy is as good as ours
    library = ctypes.CDLL(str(target))
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = RETURNS.get(name)
    return library


def _build_key(compiler: str) -> str:
    """Source, flags, compiler version and CPU features: -march=native code is only valid where built."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS))
    digest.update(" ".join(COMPILE_FLAGS + LINK_FLAGS).encode())
    digest.update(version.encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""
