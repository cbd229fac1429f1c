"""The CUDA runtime libraries that pip installs (`nvidia-*` wheels), loaded before onnxruntime's
CUDA provider asks for them.

The provider (`libonnxruntime_providers_cuda.so` of onnxruntime-gpu) needs libcudart, libcublas,
libcublasLt, libcurand and libcufft by soname; pip puts them under `site-packages/nvidia/*/lib`,
where the dynamic linker does not look. Loading each once with RTLD_GLOBAL (what
`onnxruntime.preload_dlls()` does, without importing onnxruntime's Python package and numpy into
the worker) lets the provider's own dlopen find them. A system-wide CUDA toolkit needs none of it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# In load order: each one's dependencies first.
CUDA_LIBRARIES = ("libcudart.so", "libcublasLt.so", "libcublas.so", "libcurand.so", "libcufft.so")


def nvidia_dirs() -> list[Path]:
    """Every `nvidia` folder on sys.path (pip's namespace package of the CUDA wheels)."""
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in spec.submodule_search_locations] if spec and spec.submodule_search_locations else []


def pip_cuda_libraries(roots: Iterable[Path]) -> list[Path]:
    """The first `<root>/*/lib/<name>.<major>` of each of CUDA_LIBRARIES (CUDA 13 wheels use `cu13/lib`,
    older ones `cublas/lib` and so on), in load order; a library that is not there is left out."""
    found: list[Path] = []
    candidates = sorted(p for root in roots for p in root.glob("*/lib/lib*.so.*") if p.is_file())
    for name in CUDA_LIBRARIES:
        match = next((p for p in candidates if p.name.startswith(name + ".") and p.name[len(name) + 1:].isdigit()),
                     None)
        if match is not None:
            found.append(match)
    return found


def preload_pip_cuda_libraries() -> list[Path]:
    """Load the pip-installed CUDA libraries into this process; the ones that loaded. One that does
    not load is skipped: the provider then fails with the loader's own message naming it."""
    loaded: list[Path] = []
    for path in pip_cuda_libraries(nvidia_dirs()):
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            loaded.append(path)
        except OSError as e:
            log.warning("event=cuda_library_not_loaded path=%s error=%r", path, str(e))
    return loaded
