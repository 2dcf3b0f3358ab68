"""Tensor parallelism on vLLM-CPU: the same greedy outputs from 1 and 2 worker processes?

For each KV-cache dtype (``auto`` first, as the yardstick) runs the same prompts with
``tensor_parallel_size`` 1 and 2 (vLLM's multiprocessing executor: two worker processes,
each holding half of the KV heads, and for tq presets half of the calibration), greedy,
and compares the token ids prompt by prompt: how many prompts are identical and, where
they differ, at which generated token. The TP=2 all-reduce adds the two ranks' partial
sums in another order than one GEMM does, so even ``auto`` may drift late; a tq preset
should drift no more than ``auto`` does.

    python eval/tp_equality.py [--dtypes auto,tq3.5,tq4] [--prompts 8 --new-tokens 48]

Qwen2.5-Coder-0.5B by default (14 query and 2 KV heads: one KV head per rank).

Prints a table and writes JSON (``--out``). Minutes: not part of the test run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three primary colours are",
    "Explain why the sky is blue in one paragraph.",
    "List five animals that live in the Arctic:",
    "Once upon a time, in a small village,",
    "The difference between a list and a tuple in Python is",
    "Water boils at",
    "The most important invention of the 20th century was",
    "Translate 'good morning' into Spanish, French and German:",
    "A haiku about autumn leaves:",
]


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Prompt-by-prompt comparison of two runs' token ids: identical prompts and, for the
    others, the index of the first differing token."""
    if len(a) != len(b):
        raise ValueError(f"runs have {len(a)} and {len(b)} prompts")
    first = []
    for x, y in zip(a, b):
        if x != y:
            first.append(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v),
                              min(len(x), len(y))))
    return {"prompts": len(a), "identical": len(a) - len(first), "first_difference": first}


def run(model: str, dtype: str, tp: int, prompts: list[str], new_tokens: int,
        model_dtype: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, kv_cache_dtype=dtype, dtype=model_dtype, tensor_parallel_size=tp,
              distributed_executor_backend="mp", max_model_len=1024, seed=0,
              enforce_eager=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens,
                                                ignore_eos=True), use_tqdm=True)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b",
                    help="SmolLM2's 9 attention heads do not split over 2 ranks")
    ap.add_argument("--dtypes", default="auto,tq3.5,tq4")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path("eval/results/tp_equality.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if len(os.sched_getaffinity(0)) >= 2:  # auto-binding wants one NUMA node per rank
        cpus = sorted(os.sched_getaffinity(0))
        half = len(cpus) // 2
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            ",".join(map(str, part)) for part in (cpus[:half], cpus[half:2 * half])))
    from tq_vllm.tools.models import fetch_model

    model = str(fetch_model(args.model))
    prompts = PROMPTS[:args.prompts]
    rows = []
    for dtype in args.dtypes.split(","):
        ids = {tp: run(model, dtype, tp, prompts, args.new_tokens, args.model_dtype)
               for tp in (1, 2)}
        rows.append({"kv_cache_dtype": dtype, **compare(ids[1], ids[2]),
                     "tp1": ids[1], "tp2": ids[2]})
    lines = [f"{len(prompts)} prompts × {args.new_tokens} greedy tokens, model in "
             f"{args.model_dtype}: TP=2 vs TP=1", "",
             "| kv-cache-dtype | identical prompts | first differing token (others) |",
             "|---|---|---|"]
    for r in rows:
        diff = ", ".join(map(str, sorted(r["first_difference"]))) or "–"
        lines.append(f"| {r['kv_cache_dtype']} | {r['identical']}/{r['prompts']} | {diff} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
