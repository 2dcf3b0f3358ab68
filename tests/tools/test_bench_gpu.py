"""The GPU benchmark's vLLM baselines are called as vLLM calls them: vLLM's kernel files,
loaded as on a GPU machine without a CUDA vLLM wheel (``--vllm-src`` with stand-ins for its
platform, env, logger and enum), run under the Triton interpreter; ``unified_attention``
must match exact attention on the same paged cache. Fails when vLLM changes a signature,
an import the stand-ins cover, or its cache layout under the benchmark."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parents[2] / "eval"


def test_intree_benchmark_runs_vllm_kernels_and_matches_exact_attention():
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    src = Path(spec.origin).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(EVAL / "bench_intree_gpu.py"), "--smoke",
                          "--vllm-src", str(src)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "vLLM in-tree decode ran" in run.stdout
    assert "unified_attention decode ran" in run.stdout
