"""The README's main job: serve the bundled model with a TurboQuant KV cache.

Starts ``vllm serve`` on 127.0.0.1 once with ``--kv-cache-dtype <preset>`` and
once with the exact ``auto`` cache, in the same KV budget, sends the same greedy
completion request to each, and prints answers and KV capacity side by side.

Usage: ``python -m tq_vllm.tools.demo [--model smollm2] [--kv-cache-dtype tq3.5]``
"""

from __future__ import annotations

import argparse
import sys

from tq_vllm.tools.models import MODELS, fetch_model
from tq_vllm.tools.serve import Server

DEFAULT_DTYPE = "tq3.5"
"""The demo's preset: the recommended 3.5-bit cache."""
PROMPT = "The capital of France is"


def run(model: str, dtype: str, prompt: str, max_tokens: int, kv_space_gib: int) -> list[dict]:
    path = str(fetch_model(model))
    rows = []
    for cache_dtype in dict.fromkeys([dtype, "auto"]):
        print(f"[demo] starting vllm serve {model} --kv-cache-dtype {cache_dtype} ...", flush=True)
        with Server(path, kv_cache_dtype=cache_dtype, kv_space_gib=kv_space_gib) as srv:
            answer = srv.complete(prompt, max_tokens)
            rows.append({"kv_cache_dtype": cache_dtype, "kv_tokens": srv.kv_cache_tokens(),
                         "answer": answer})
    return rows


def format_rows(rows: list[dict], prompt: str, kv_space_gib: int) -> str:
    auto = next(r["kv_tokens"] for r in rows if r["kv_cache_dtype"] == "auto")
    lines = [f"prompt: {prompt!r}   KV budget: {kv_space_gib} GiB",
             f"{'kv-cache-dtype':<16}{'KV tokens':>12}{'vs auto':>9}  answer"]
    for r in rows:
        ratio = f"{r['kv_tokens'] / auto:.2f}x" if r["kv_tokens"] and auto else "n/a"
        lines.append(f"{r['kv_cache_dtype']:<16}{r['kv_tokens'] or 'n/a':>12}{ratio:>9}  "
                     f"{r['answer']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--kv-cache-dtype", default=DEFAULT_DTYPE)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-space-gib", type=int, default=1)
    args = ap.parse_args(argv)
    rows = run(args.model, args.kv_cache_dtype, args.prompt, args.max_tokens, args.kv_space_gib)
    print(format_rows(rows, args.prompt, args.kv_space_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
