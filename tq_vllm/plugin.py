"""vLLM entry point (``vllm.general_plugins`` → :func:`register`).

vLLM calls :func:`register` in every process (API server, engine core, workers)
before it parses arguments. It must be idempotent and cheap.
"""

from __future__ import annotations

import logging

from tq_vllm.version import check_vllm_version, installed_vllm_version

logger = logging.getLogger("tq_vllm")

_state = {"registered": False, "vllm_version": None}


def register() -> None:
    """Check the vLLM version and register tq-vllm with vLLM (idempotent)."""
    if _state["registered"]:
        return
    _state["vllm_version"] = check_vllm_version(installed_vllm_version())
    _state["registered"] = True
    logger.debug("tq-vllm registered with vLLM %s", _state["vllm_version"])


def is_registered() -> bool:
    return bool(_state["registered"])
