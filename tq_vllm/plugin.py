"""vLLM entry point (``vllm.general_plugins`` → :func:`register`).

vLLM calls :func:`register` in every process (API server, engine core, workers)
before it parses arguments. It is idempotent, imports the backend lazily (by
class path) and applies the patches in ``tq_vllm.patches`` explicitly.

vLLM only logs exceptions raised by a plugin. So when registration fails we
still make the ``tq*`` names parse, and install a guard that makes any engine
configured with them fail with the original error (never a silent fallback).
"""

from __future__ import annotations

import logging

from tq_vllm.config import (
    PRESET_NAMES,
    SUPPORTED_HEAD_DIMS,
    backend_class_path,
    backend_enum_name,
    is_tq_dtype,
)
from tq_vllm.version import check_vllm_version, installed_vllm_version

logger = logging.getLogger("tq_vllm")

_state: dict = {"registered": False, "error": None}


def route(kv_cache_dtype: object, sel) -> str | None:
    """Backend class path for a ``tq*`` dtype, or None for any other dtype.

    ``sel`` is vLLM's ``AttentionSelectorConfig``; combinations the codec cannot
    serve raise a clear error naming the alternative.
    """
    if not is_tq_dtype(kv_cache_dtype):
        return None
    why = None
    if sel.use_mla:
        why = "MLA attention (compressed latent KV)"
    elif sel.use_sparse:
        why = "sparse attention"
    elif sel.has_sliding_window:
        why = "sliding-window layers (list them in --kv-cache-dtype-skip-layers sliding_window)"
    elif sel.has_sink:
        why = "attention sinks"
    elif str(sel.attn_type) not in ("decoder", "AttentionType.DECODER"):
        why = f"{sel.attn_type} attention"
    elif sel.head_size not in SUPPORTED_HEAD_DIMS:
        why = f"head_size {sel.head_size} (supported: {SUPPORTED_HEAD_DIMS})"
    if why:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: tq-vllm does not support {why}. "
                         "Use --kv-cache-dtype auto or fp8 for this model.")
    return backend_class_path(kv_cache_dtype)


def _register_backends() -> None:
    from vllm.v1.attention.backends.registry import register_backend

    for name in PRESET_NAMES:
        register_backend(backend_enum_name(name), backend_class_path(name))


def _register(version: str) -> None:
    from tq_vllm.patches import cache_dtype, cpu_attn_backend, torch_dtype_map

    check_vllm_version(version)
    cache_dtype.apply(PRESET_NAMES, version)
    torch_dtype_map.apply(PRESET_NAMES, version)
    _register_backends()
    cpu_attn_backend.apply(route, version)


def _fail_loudly(error: BaseException) -> None:
    from tq_vllm.patches import cache_dtype, engine_args_guard

    logger.error("tq-vllm failed to register with vLLM: %s", error, exc_info=error)
    try:
        cache_dtype.extend(PRESET_NAMES)
    except Exception:  # the guard below still stops tq* engines
        logger.exception("tq-vllm could not add its names to --kv-cache-dtype")
    engine_args_guard.apply(f"{type(error).__name__}: {error}", PRESET_NAMES)


def register() -> None:
    """Register presets, backends and patches with vLLM (idempotent)."""
    if _state["registered"]:
        return
    _state["registered"] = True
    try:
        _register(installed_vllm_version())
    except Exception as e:
        _state["error"] = e
        _fail_loudly(e)


def registration_error() -> BaseException | None:
    return _state["error"]
