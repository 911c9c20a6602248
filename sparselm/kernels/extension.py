"""Build and load the C++/OpenMP sparse kernels once per machine, or say why not.

The extension is compiled with `torch.utils.cpp_extension.load` on first use into
`sparselm.cache.cache_dir("ext", <variant>)` (`$SPARSELM_CACHE/ext/...`, default
`~/.cache/sparselm/ext/...`), where the variant
names the instruction set the compiler flags target (AVX-512 when this CPU has it, checked at
run time, else AVX2, else portable C++). Later processes reuse the built library; PyTorch
rebuilds it when the sources or flags change.

Guarantee: `load_extension()` never raises. If there is no compiler, no ninja, or the build
fails, it warns once (naming the reason and that the pure-PyTorch fallback is in use) and
returns None. Set `SPARSELM_DISABLE_EXTENSION=1` to force the fallback.
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

from sparselm.cache import cache_dir

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))
_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": None}




def cpu_instruction_set() -> str:
    """'avx512', 'avx2' or 'portable': the widest vector ISA both this CPU and the kernels use."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability().upper()  # e.g. "AVX512", "AVX2", "DEFAULT"
    if capability.startswith("AVX512"):
        return "avx512"
    if capability.startswith("AVX2"):
        return "avx2"
    return "portable"


def _compiler_flags(isa: str) -> list[str]:
    common = ["-O3", "-fopenmp", "-std=c++17"]
    if isa == "avx512":
        # The kernels need F (zmm), BW+VL (masked 16-bit and 256-bit ops); DQ comes with them.
        return common + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mpopcnt"]
    if isa == "avx2":
        return common + ["-mavx2", "-mfma", "-mpopcnt"]
    return common


def _warn_once(reason: str) -> None:
    _state["reason"] = reason
    warnings.warn(
        f"sparselm: the C++ sparse kernels are unavailable ({reason}); using the pure-PyTorch "
        "fallback, which is correct but not faster than dense. Install a C++ compiler and "
        "ninja to get the fast path.", RuntimeWarning, stacklevel=3)


def load_extension(verbose: bool = False):
    """Return the compiled kernel module, building it on first use, or None (warned once)."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        if os.environ.get("SPARSELM_DISABLE_EXTENSION", "") not in ("", "0"):
            _state["reason"] = "disabled by SPARSELM_DISABLE_EXTENSION"
            return None
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _warn_once("no C++ compiler found on PATH")
            return None
        try:
            from torch.utils import cpp_extension

            if not cpp_extension.is_ninja_available():
                _warn_once("ninja is not installed (pip install ninja)")
                return None
            isa = cpu_instruction_set()
            build_dir = cache_dir("ext", f"sparselm_kernels_{isa}")
            module = cpp_extension.load(
                name=f"sparselm_kernels_{isa}",
                sources=[str(p) for p in _SOURCES],
                extra_cflags=_compiler_flags(isa),
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(_CSRC)],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as err:  # any build or import failure means: use the fallback
            lines = str(err).strip().splitlines() or [type(err).__name__]
            # The compiler's own "error:" line says more than ninja's command line.
            reason = next((line for line in lines if "error:" in line), lines[0])
            _warn_once(f"build failed: {reason.strip()[:240]}")
            return None
        _state["module"] = module
        return module


def kernel_fingerprint() -> str:
    """Short hash of the kernel sources: timings measured with other sources are stale."""
    if "fingerprint" not in _state:
        import hashlib

        digest = hashlib.sha1()
        for path in sorted(_CSRC.glob("*")):
            digest.update(path.name.encode() + path.read_bytes())
        _state["fingerprint"] = digest.hexdigest()[:12]
    return _state["fingerprint"]


def extension_status() -> str:
    """One line saying which kernels are in use, for reports and benchmarks."""
    module = load_extension()
    if module is None:
        return f"pure-PyTorch fallback ({_state['reason']})"
    isa = {"avx512": "AVX-512", "avx2": "AVX2"}.get(module.compiled_simd(), "portable C++")
    return f"C++/OpenMP extension ({isa})"
