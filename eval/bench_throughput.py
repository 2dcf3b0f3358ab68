"""End-to-end offline throughput through vLLM: ``auto``, ``fp8`` and tq presets side by side.

16 prompts × ~128 prompt tokens × 128 new tokens (greedy, ignore_eos) on the bundled
model, one engine after another in this process, same settings. Prints tokens/s,
the ratio to ``auto`` and the KV capacity; writes JSON.

    python eval/bench_throughput.py [--model smollm2] [--dtypes auto,fp8,tq4,tq3.5] \
        [--modes eager,compiled]

``--modes eager,compiled`` runs every dtype in both modes in one run; ratios are to
``auto`` in the same mode.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path


def prompts(n: int, words: int) -> list[str]:
    base = ("The history of computing spans mechanical calculators, vacuum tubes, transistors, "
            "integrated circuits and the networks that connect them. ").split()
    return [" ".join(f"[{i}]" if j == 0 else base[(i + j) % len(base)] for j in range(words))
            for i in range(n)]


def run(model: str, dtype: str, compiled: bool, n: int, words: int, new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, kv_cache_dtype=dtype, dtype="bfloat16", max_model_len=2048, seed=0,
              enforce_eager=not compiled)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ps = prompts(n, words)
    llm.generate(ps[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(ps, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    res = {"kv_cache_dtype": dtype, "compiled": compiled, "seconds": dt, "generated_tokens": gen,
           "tokens_per_s": gen / dt, "kv_tokens": cache.num_gpu_blocks * cache.block_size}
    del llm
    gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    from tq_vllm.kernels.cpu_native import has_avx512

    fp8 = "fp8," if has_avx512() else ""  # vLLM-CPU's fp8 cache needs AVX-512 or AMX
    ap.add_argument("--dtypes", default=f"auto,{fp8}tq4,tq3.5,tq3,tq2.5")
    ap.add_argument("--modes", default="eager",
                    help="comma list of eager / compiled (torch.compile + CPU graph passes)")
    ap.add_argument("--compiled", action="store_true", help="same as --modes compiled")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=100)  # ≈128 tokens
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="eval/results/bench_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tq_vllm.tools.models import fetch_model

    model = str(fetch_model(args.model))
    modes = ["compiled"] if args.compiled else args.modes.split(",")
    if not set(modes) <= {"eager", "compiled"}:
        raise SystemExit(f"--modes takes eager and/or compiled, got {args.modes!r}")
    rows = []
    for mode in modes:
        for dtype in args.dtypes.split(","):
            print(f"[bench] {dtype} ({mode}) ...", flush=True)
            rows.append(run(model, dtype, mode == "compiled", args.prompts, args.prompt_words,
                            args.new_tokens))
    print(f"{'mode':<10}{'kv-cache-dtype':<14}{'tok/s':>9}{'vs auto':>9}{'KV tokens':>11}")
    for r in rows:
        auto = next((a["tokens_per_s"] for a in rows
                     if a["kv_cache_dtype"] == "auto" and a["compiled"] == r["compiled"]), None)
        ratio = f"{r['tokens_per_s'] / auto:.2f}" if auto else "n/a"
        mode = "compiled" if r["compiled"] else "eager"
        print(f"{mode:<10}{r['kv_cache_dtype']:<14}{r['tokens_per_s']:>9.1f}{ratio:>9}"
              f"{r['kv_tokens']:>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
