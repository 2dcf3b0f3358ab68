"""Build and bind the AVX-512 C++ decode kernel (``csrc/tq_decode_avx512.cpp``).

The source is compiled on first use with the system C++ compiler into a cache
folder (``$TQ_VLLM_CACHE`` or ``~/.cache/tq_vllm``), keyed by a hash of the
source and flags, under a file lock so concurrent vLLM workers build it once.
It is a plain shared library called through ``ctypes`` (no PyTorch headers, so
it builds in about a second); OpenMP resolves to the ``libgomp`` PyTorch has
already loaded. :func:`load` returns None where AVX-512 or a compiler is
missing; callers then fall back to the Numba kernel.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger("tq_vllm")

SOURCE = Path(__file__).with_name("csrc") / "tq_decode_avx512.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512dq",
         "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "fma", "f16c")
DISABLE_ENV = "TQ_VLLM_DISABLE_NATIVE"

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
ARGTYPES = [_P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _F,
            _P, _P, _P, _P, _P, ctypes.c_int]


def cpu_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in REQUIRED_CPU_FLAGS)


def cache_dir() -> Path:
    return Path(os.environ.get("TQ_VLLM_CACHE", Path.home() / ".cache" / "tq_vllm"))


def _build(compiler: str) -> Path:
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"tq_decode_avx512-{tag}.so"
    with open(out_dir / f"{lib.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                tmp_lib = Path(tmp) / lib.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp_lib)], check=True,
                               capture_output=True, text=True)
                os.replace(tmp_lib, lib)
    return lib


@lru_cache(maxsize=1)
def load():
    """The bound ``tq_decode_avx512`` function, or None (with the reason logged)."""
    if os.environ.get(DISABLE_ENV):
        return None
    if not cpu_supported():
        logger.info("tq-vllm: CPU lacks %s; using the Numba decode kernel", REQUIRED_CPU_FLAGS)
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("tq-vllm: no C++ compiler found; using the slower Numba decode kernel")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("tq-vllm: building the AVX-512 kernel failed (%s); using Numba", detail[-2000:])
        return None
    fn = lib.tq_decode_avx512
    fn.argtypes = ARGTYPES
    fn.restype = ctypes.c_int
    return fn
