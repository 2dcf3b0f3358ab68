"""Patch ``vllm.config.cache.CacheDType``: accept the ``tq*`` preset names.

Why: ``--kv-cache-dtype`` values come from one ``typing.Literal``, read by the
pydantic ``CacheConfig``, ``EngineArgs`` / argparse choices and an assert in the
attention selector. vLLM has no registry for out-of-tree KV-cache dtypes.
How: append our names to the Literal's ``__args__`` (the same object every
reader holds) and rebuild the pydantic dataclass so its validator sees them.
Remove when: vLLM offers a plugin hook to register KV-cache dtypes.
"""

from __future__ import annotations

from typing import get_args

from tq_vllm.version import check_vllm_version

TARGET = "vllm.config.cache.CacheDType"


def is_applied(names: tuple[str, ...]) -> bool:
    from vllm.config import cache

    return set(names) <= set(get_args(cache.CacheDType))


def apply(names: tuple[str, ...], vllm_version: str) -> None:
    """Add ``names`` to ``CacheDType`` (idempotent) after the version check."""
    check_vllm_version(vllm_version)
    extend(names)


def extend(names: tuple[str, ...]) -> None:
    """Add ``names`` to ``CacheDType`` without the version check (failure path)."""
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config import cache

    if is_applied(names):
        return
    args = get_args(cache.CacheDType)
    cache.CacheDType.__args__ = args + tuple(n for n in names if n not in args)
    rebuild_dataclass(cache.CacheConfig, force=True)
