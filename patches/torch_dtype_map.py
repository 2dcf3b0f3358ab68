"""Patch ``vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE``: ``tq*`` → ``torch.uint8``.

Why: vLLM maps ``--kv-cache-dtype`` to the cache tensor's element type through
this dict (``kv_cache_dtype_str_to_dtype``); our packed slots are bytes.
How: add one entry per preset name.
Remove when: vLLM lets a backend declare the storage dtype of a custom cache dtype.
"""

from __future__ import annotations

import torch

from tq_vllm.version import check_vllm_version

TARGET = "vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE"


def is_applied(names: tuple[str, ...]) -> bool:
    from vllm.utils import torch_utils

    return all(torch_utils.STR_DTYPE_TO_TORCH_DTYPE.get(n) is torch.uint8 for n in names)


def apply(names: tuple[str, ...], vllm_version: str) -> None:
    check_vllm_version(vllm_version)
    from vllm.utils import torch_utils

    for n in names:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE[n] = torch.uint8
