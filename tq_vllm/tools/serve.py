"""Start and stop a local ``vllm serve`` process and talk to it (demo, tests, soak).

Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
_KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
_CONCURRENCY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The ``vllm`` console script next to this interpreter (what a user runs)."""
    script = Path(sys.executable).with_name("vllm")
    if script.exists():
        return [str(script)]
    found = shutil.which("vllm")
    if found:
        return [found]
    raise FileNotFoundError("no `vllm` console script found; run `make setup` first")


@dataclass
class Server:
    """A ``vllm serve`` child process on 127.0.0.1 with its log in a temp file."""

    model: str
    kv_cache_dtype: str = "auto"
    kv_space_gib: int = 1
    max_model_len: int = 2048
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 600.0) -> "Server":
        self.port = self.port or free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.kv_space_gib))
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        cmd = vllm_command() + [
            "serve", self.model, "--host", HOST, "--port", str(self.port),
            "--kv-cache-dtype", self.kv_cache_dtype, "--max-model-len", str(self.max_model_len),
            "--served-model-name", "model", "--enforce-eager", *self.extra_args,
        ]
        fd, name = tempfile.mkstemp(prefix="tq-vllm-serve-", suffix=".log")
        self.log_path = Path(name)
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kv_cache_tokens(self) -> int | None:
        """``N`` from vLLM's log line ``KV cache size: N tokens``."""
        m = _KV_TOKENS.findall(self.log())
        return int(m[-1].replace(",", "")) if m else None

    def max_concurrency(self) -> float | None:
        m = _CONCURRENCY.findall(self.log())
        return float(m[-1][1]) if m else None

    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def complete(self, prompt: str, max_tokens: int = 32) -> str:
        """Greedy completion text."""
        out = self.post("/v1/completions", {"model": "model", "prompt": prompt,
                                            "max_tokens": max_tokens, "temperature": 0.0})
        return out["choices"][0]["text"]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
