"""Calibration text and per-model calibration files for the key/value transforms.

Calibration text: Python's own language reference (``pydoc_data.topics``, shipped
with every CPython, PSF licence) — English prose with code, present wherever tq-vllm
runs and disjoint from the evaluation text (Paul Graham essays).

Calibration file: per layer, the moments of post-RoPE keys, values and queries
(:class:`tq_vllm.calibration.KVStats`), computed once per model with transformers on
the CPU and cached under ``$TQ_VLLM_CACHE/calibration`` (default ``~/.cache/tq_vllm``),
keyed by the model's config, weight files and the recipe version. The vLLM backend
loads it on first use; ``python -m tq_vllm.tools.calibrate MODEL_DIR`` precomputes it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

from tq_vllm.calibration import KVStats
from tq_vllm.kernels.cpu_native import cache_dir

logger = logging.getLogger("tq_vllm")


def calibration_text() -> str:
    """The calibration corpus: CPython's ``pydoc_data`` topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_token_chunks(tokenizer, num_chunks: int, length: int) -> list[torch.Tensor]:
    """``num_chunks`` consecutive windows of ``length`` token ids (long ``[length]``)."""
    ids = tokenizer(calibration_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < num_chunks * length:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need {num_chunks * length}")
    return [ids[i * length:(i + 1) * length] for i in range(num_chunks)]


CALIBRATION_VERSION = 2
"""Bump when the statistics or the text change: cached files are keyed by it."""
NUM_CHUNKS, CHUNK_TOKENS = 4, 1024
"""4 × 1024 tokens of calibration text: about 15 s for a 135M model on 2 CPU cores."""


def _fingerprint(model_path: Path) -> str:
    """Cache key of a local HF folder: its config, weight file names and sizes, the recipe."""
    h = hashlib.sha256(f"v{CALIBRATION_VERSION}/{NUM_CHUNKS}x{CHUNK_TOKENS}".encode())
    h.update((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:20]


def calibration_path(model_path: str | os.PathLike) -> Path:
    """Where the calibration of the local HF folder ``model_path`` is cached."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"tq-vllm calibrates its recommended tq* presets from a local Hugging Face folder; "
            f"{model_path!s} is not one. Download the model to a folder and serve that path, "
            "or use a preset without calibration (tq{b}-mse, tq{b}-qjl).")
    return cache_dir() / "calibration" / f"{path.name}-{_fingerprint(path)}.pt"


@torch.no_grad()
def compute_calibration(model_path: str | os.PathLike) -> dict[int, KVStats]:
    """Per-layer :class:`KVStats` of ``model_path`` on the calibration text (float32, CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tq_vllm.tools import hf_attention

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with hf_attention.capture(model) as stats:
        for chunk in calibration_token_chunks(tok, NUM_CHUNKS, CHUNK_TOKENS):
            model(chunk[None])
    return stats


@lru_cache(maxsize=4)
def model_calibration(model_path: str | os.PathLike) -> dict[int, KVStats]:
    """Cached per-layer calibration of ``model_path``; computed once under a file lock
    (every vLLM worker of every process gets the same bytes)."""
    out = calibration_path(model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            t0 = time.time()
            stats = compute_calibration(model_path)
            sd = {k: v for i, s in stats.items() for k, v in s.state_dict(f"{i}.").items()}
            tmp = out.with_suffix(".tmp")
            torch.save(sd, tmp)
            os.replace(tmp, out)
            logger.info("tq-vllm: calibrated %s in %.0f s → %s", model_path, time.time() - t0, out)
    sd = torch.load(out, weights_only=True)
    layers = sorted({int(k.split(".")[0]) for k in sd})
    return {i: KVStats.from_state_dict(sd, f"{i}.") for i in layers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compute and cache tq-vllm's calibration of a model")
    ap.add_argument("model", help="local Hugging Face folder")
    args = ap.parse_args(argv)
    stats = model_calibration(args.model)
    print(f"{len(stats)} layers → {calibration_path(args.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
