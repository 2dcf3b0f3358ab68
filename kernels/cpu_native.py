"""Build and bind the SIMD C++ kernels: ``csrc/tq_decode_cpu.cpp`` — decode
(``tq_decode_cpu``) and prefill over the packed cache (``tq_prefill_cpu``), and the
trellis-code searches of the store (``tq_trellis_encode_cpu``, and
``tq_trellis_encode_fed_cpu`` against a query weight) — and ``csrc/tq_store_cpu.cpp``,
the store itself (``tq_store_cpu``); ``csrc/tq_cpu_common.h`` holds what both share.

The sources are compiled on first use with the system C++ compiler into a cache
folder (``$TQ_VLLM_CACHE`` or ``~/.cache/tq_vllm``), keyed by a hash of the
source and flags, under a file lock so concurrent vLLM workers build it once:
for AVX-512 where the CPU has it, else for AVX2 + FMA + F16C (e.g. AMD EPYC
before Zen 4). It is a plain shared library called through ``ctypes`` (no
PyTorch headers, so it builds in about a second); OpenMP resolves to the
``libgomp`` PyTorch has already loaded. :func:`load` returns None where neither
instruction set or no compiler is there (:func:`load_prefill` likewise); callers
then fall back to the Numba kernel.

On CPUs with AVX512-BF16 and VBMI the AVX-512 build also runs bf16 models' decode and
prefill on the tile bodies (``csrc/tq_attend_amx.h``: bf16 products, on AMX tiles where
the CPU has AMX, else on vdpbf16ps): with AMX by default for GQA groups of 6 query heads or
more and for rows that attend to 2048 tokens or more, without it for every row (faster
than the float32 bodies there: docs/performance.md): :func:`set_amx`, :func:`amx_mode`,
``$TQ_VLLM_CPU_AMX``.
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

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "tq_decode_cpu.cpp", CSRC / "tq_store_cpu.cpp")
HEADERS = (CSRC / "tq_cpu_common.h", CSRC / "tq_attend_amx.h")
ISAS = {
    "avx512": (["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"],
               ("avx512f", "avx512dq", "avx512bw", "avx512vl", "fma", "f16c")),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
}
"""Builds in order of preference: compiler flags and the /proc/cpuinfo flags they need."""
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
"""``-ffp-contract=off``: no multiply-add fused unless written as one, so the trellis search
rounds each operation as the PyTorch reference does (its codes must match bit for bit)."""
DISABLE_ENV = "TQ_VLLM_DISABLE_NATIVE"
ISA_ENV = "TQ_VLLM_NATIVE_ISA"
"""Force one build (``avx2`` on an AVX-512 machine, to test or compare it)."""
AMX_ENV = "TQ_VLLM_CPU_AMX"
"""Where the CPU has them, bf16 models' decode and prefill run on the tile bodies (bf16
products: AMX tiles, else AVX512-BF16 dot products) for GQA groups of 6 query heads or more
and for rows (a decode step, a prompt token) that attend to 2048 tokens or more (``auto``,
the default), for every row (``1``) or never (``0``); ``dp``: for every row with their
products on AVX512-BF16 dot products even where the CPU has AMX tiles (the engine a CPU
without AMX takes; on an AMX CPU, to compare the two: ``eval/bench_decode.py --impls
native-amx,native-dp``)."""
AMX_MODES = {"0": 0, "auto": 1, "1": 2, "dp": 2}
DP_CPU_FLAGS = ("avx512_bf16", "avx512vbmi")
"""What the tile bodies (csrc/tq_attend_amx.h) run on, besides the AVX-512 build: their
products on vdpbf16ps (AMD Zen 4, Intel Cooper Lake)."""
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16", *DP_CPU_FLAGS)
"""What the tile bodies need to run their products on AMX tiles (Intel Sapphire Rapids on)."""

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_C = ctypes.c_int
ARGTYPES = [_P, _I, _I, _I, _P, _I, _P, _P, _C, _I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I,
            _I, _F, _F, _P, _P, _P, _P, _P, _C, _I, _C]
PREFILL_ARGTYPES = [_P, _I, _I, _I, _P, _I, _P, _P, _P, _C, _I, _P, _P, _P, _P, _P, _I, _I, _I,
                    _I, _I, _I, _F, _F, _P, _P, _P, _P, _P, _C, _I, _C, _I]
TRELLIS_ARGTYPES = [_P, _I, _I, _I, _I, _P, _P, _C]
TRELLIS_FED_ARGTYPES = [_P, _I, _I, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _C]
STORE_ARGTYPES = [_P, _P, _C, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I, _I, _I, _I, _I,
                  _P, _P, _P, _P, _I, _P, _P, _P, _C, _P, _P, _P, _C, _P, _P, _P, _P, _P, _P, _C]
DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2}
"""The model dtypes the kernels read and write directly (``DT_*`` in csrc/tq_cpu_common.h)."""


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once: parsing /proc/cpuinfo takes ~40 us, and
    :func:`set_amx` (called between timed runs by the benchmarks) asks five times."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def has_avx512() -> bool:
    """Whether the CPU has the AVX-512 subsets our kernel (and vLLM-CPU's fp8 cache) use."""
    return all(f in _cpu_flags() for f in ISAS["avx512"][1])


def best_isa() -> str | None:
    """The preferred build this CPU runs (``$TQ_VLLM_NATIVE_ISA`` narrows it), or None."""
    flags = _cpu_flags()
    wanted = os.environ.get(ISA_ENV)
    for isa, (_, needs) in ISAS.items():
        if (wanted is None or wanted == isa) and all(f in flags for f in needs):
            return isa
    return None


def find_compiler() -> str | None:
    """The C++ compiler the kernels are built with (``$CXX``, else g++ or c++), or None."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cache_dir() -> Path:
    return Path(os.environ.get("TQ_VLLM_CACHE", Path.home() / ".cache" / "tq_vllm"))


def _build(compiler: str, isa: str) -> Path:
    flags = BASE_FLAGS + ISAS[isa][0]
    src = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    tag = hashlib.sha256(src + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"tq_decode_{isa}-{tag}.so"
    with open(out_dir / f"{lib.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                tmp_lib = Path(tmp) / lib.name
                subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(tmp_lib)], check=True,
                               capture_output=True, text=True)
                os.replace(tmp_lib, lib)
    return lib


@lru_cache(maxsize=1)
def _library():
    """The built shared library for this CPU, or None (with the reason logged)."""
    isa = best_isa()
    if isa is None:
        logger.info("tq-vllm: CPU has neither AVX-512 nor AVX2+FMA+F16C; using the Numba "
                    "decode kernel")
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.warning("tq-vllm: no C++ compiler found; using the slower Numba decode kernel")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, isa)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("tq-vllm: building the %s kernel failed (%s); using Numba", isa,
                       detail[-2000:])
        return None
    lib = bind(lib)
    _enable_amx(lib, amx_default() if isa == "avx512" else 0)
    return lib


_dp_told: bool | None = None
"""The engine :func:`set_amx` was last told (None: the CPU's own, see :func:`_dp`)."""


def _dp() -> bool:
    """Whether the tile bodies' products run on vdpbf16ps: where :func:`set_amx` was told
    so, else where the CPU has no AMX or ``$TQ_VLLM_CPU_AMX`` is ``dp``."""
    if _dp_told is not None:
        return _dp_told
    return _amx_env() == "dp" or not _cpu_has_amx()


def _enable_amx(lib: ctypes.CDLL, mode: int) -> int:
    got = lib.tq_amx_enable(mode, int(_dp()))
    if mode and not got:
        logger.warning("tq-vllm: the kernel refused AMX tile data; bf16 attention runs on "
                       "float32 FMAs")
    return got


def _cpu_has_amx() -> bool:
    return all(f in _cpu_flags() for f in AMX_CPU_FLAGS)


def _cpu_has_dp() -> bool:
    return all(f in _cpu_flags() for f in DP_CPU_FLAGS)


def _amx_env() -> str:
    """``$TQ_VLLM_CPU_AMX``, checked (default ``auto``)."""
    value = os.environ.get(AMX_ENV, "auto").strip().lower()
    if value not in AMX_MODES:
        raise ValueError(f"{AMX_ENV} must be one of {sorted(AMX_MODES)}, got {value!r}")
    return value


def amx_default() -> int:
    """The tile bodies' mode unless told otherwise (0 off, 1 auto, 2 every row):
    ``$TQ_VLLM_CPU_AMX`` (``0`` / ``auto`` / ``1`` / ``dp``, default ``auto``), 0 where the
    CPU lacks what they need. ``auto`` is 1 with AMX tiles and 2 on vdpbf16ps products (a
    Zen 4: there they beat the float32 bodies in decode too, at every length measured)."""
    value = _amx_env()
    return amx_mode_of(value) if _cpu_has_dp() else 0


def amx_mode_of(value: str) -> int:
    """The mode a ``$TQ_VLLM_CPU_AMX`` value names on this CPU: ``auto`` is 1 with AMX tiles
    and 2 on vdpbf16ps products."""
    mode = AMX_MODES[value]
    return 2 if mode == 1 and not _cpu_has_amx() else mode


def set_amx(mode: int, dp: bool | None = None) -> int:
    """Run bf16 models' decode and prefill on the tile bodies: mode 0 never, 1 for GQA groups
    of 6 query heads or more and rows of 2048 tokens or more (each row by its own length), 2
    for every row. ``dp``: their products on AVX512-BF16 dot products (True) or AMX tiles
    (False), kept for later calls; by default AMX where the CPU has it. Returns the mode in
    effect (0 where the CPU or build lacks what they need)."""
    global _dp_told
    if dp is not None:
        _dp_told = dp
    lib = _library() if load() is not None else None
    if lib is None:
        return 0
    ok = best_isa() == "avx512" and (_cpu_has_dp() if _dp() else _cpu_has_amx())
    return _enable_amx(lib, mode if ok else 0)


def amx_mode() -> int:
    """The AMX mode in effect (0 off, 1 auto, 2 every row)."""
    lib = _library() if load() is not None else None
    return 0 if lib is None else lib.tq_amx_mode()


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the argument and return types of its exported kernels set."""
    for name, argtypes in (("tq_decode_cpu", ARGTYPES), ("tq_prefill_cpu", PREFILL_ARGTYPES),
                           ("tq_trellis_encode_cpu", TRELLIS_ARGTYPES),
                           ("tq_trellis_encode_fed_cpu", TRELLIS_FED_ARGTYPES),
                           ("tq_store_cpu", STORE_ARGTYPES)):
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    for name, argtypes in (("tq_amx_enable", [_C, _C]), ("tq_amx_mode", [])):
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


@lru_cache(maxsize=1)
def load():
    """The bound ``tq_decode_cpu`` function of the best build for this CPU, or None
    (``$TQ_VLLM_DISABLE_NATIVE`` set, or no build: reason logged)."""
    if os.environ.get(DISABLE_ENV):
        return None
    lib = _library()
    return lib.tq_decode_cpu if lib is not None else None


def load_prefill():
    """The bound ``tq_prefill_cpu`` function, or None where :func:`load` gives None."""
    return None if load() is None else _library().tq_prefill_cpu


def load_trellis():
    """The bound ``tq_trellis_encode_cpu`` function, or None where :func:`load` gives None."""
    return None if load() is None else _library().tq_trellis_encode_cpu


def load_trellis_fed():
    """The bound ``tq_trellis_encode_fed_cpu`` function, or None where :func:`load` gives None."""
    return None if load() is None else _library().tq_trellis_encode_fed_cpu


def load_store():
    """The bound ``tq_store_cpu`` function, or None where :func:`load` gives None."""
    return None if load() is None else _library().tq_store_cpu
