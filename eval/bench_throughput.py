"""End-to-end offline throughput through vLLM: ``auto``, ``fp8`` and tq presets side by side.

16 prompts × ~128 prompt tokens × 128 new tokens (greedy, ignore_eos) on the bundled
model, one engine after another in this process, same settings. Prints tokens/s,
requests/s, mean time to first token and time per output token (vLLM's per-request
timestamps), the ratio to ``auto`` and the KV capacity; writes JSON and markdown.

    python eval/bench_throughput.py [--model smollm2] [--dtypes auto,fp8,tq4,tq3.5] \
        [--modes eager,compiled] [--prompts 16 --prompt-words 100 --new-tokens 128]

``--modes eager,compiled`` runs every dtype in both modes in one run; ratios are to
``auto`` in the same mode. ``--kv-budget-mib M`` gives every dtype the same KV bytes
(blocks of 32 tokens, ``num_gpu_blocks_override`` = M MiB / the dtype's bytes per block,
from the preset's slot size): with many long requests ``auto`` must queue where the
compressed cache holds them all (capacity-bound serving):

    python eval/bench_throughput.py --kv-budget-mib 12 --max-model-len 512 --prompts 32 \
        --new-tokens 256
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


BUDGET_BLOCK = 32
"""Tokens per block with ``--kv-budget-mib``: vLLM-CPU's CPU_ATTN takes multiples of 32 (bf16),
our backend multiples of 16."""


def bytes_per_token(model: str, dtype: str) -> int:
    """KV bytes one token takes over all layers and KV heads (bf16 model)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if dtype == "auto":
        slot = 2 * 2 * d
    elif dtype.startswith("fp8"):
        slot = 2 * d
    else:
        from tq_vllm.config import get_preset

        slot = get_preset(dtype).layout(d).slot_bytes
    return cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * slot


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run(model: str, dtype: str, compiled: bool, n: int, words: int, new_tokens: int,
        budget_mib: float | None = None, max_model_len: int = 2048) -> dict:
    from vllm import LLM, SamplingParams

    extra = {}
    if budget_mib:
        per_block = BUDGET_BLOCK * bytes_per_token(model, dtype)
        extra = {"block_size": BUDGET_BLOCK,
                 "num_gpu_blocks_override": int(budget_mib * 2**20 // per_block)}
    llm = LLM(model=model, kv_cache_dtype=dtype, dtype="bfloat16", max_model_len=max_model_len, seed=0,
              enforce_eager=not compiled, disable_log_stats=False, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ps = prompts(n, words)
    llm.generate(ps[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(ps, params, use_tqdm=True)
    dt = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = [o.metrics for o in outs if o.metrics is not None]
    tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
            for m in stats if m.num_generation_tokens > 1]
    res = {"kv_cache_dtype": dtype, "compiled": compiled, "seconds": dt, "generated_tokens": gen,
           "tokens_per_s": gen / dt, "requests_per_s": len(outs) / dt,
           "ttft_s": _mean([m.first_token_latency for m in stats]),
           "tpot_s": _mean(tpot), "preemptions": sum(m.num_preemptions for m in stats),
           "kv_tokens": cache.num_gpu_blocks * cache.block_size, "kv_budget_mib": budget_mib}
    del llm
    gc.collect()
    return res


def table(rows: list[dict], args) -> str:
    """Markdown, ratios to ``auto`` in the same mode."""
    budget = f", KV budget {args.kv_budget_mib:g} MiB" if args.kv_budget_mib else ""
    lines = [f"{args.prompts} prompts × {args.prompt_words} words × {args.new_tokens} new "
             f"tokens{budget}", "",
             "| mode | kv-cache-dtype | tok/s | vs auto | req/s | TTFT s | TPOT ms | "
             "preemptions | KV tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        auto = next((a["tokens_per_s"] for a in rows
                     if a["kv_cache_dtype"] == "auto" and a["compiled"] == r["compiled"]), None)
        ratio = f"{r['tokens_per_s'] / auto:.2f}" if auto else "n/a"
        ttft = f"{r['ttft_s']:.2f}" if r["ttft_s"] is not None else "?"
        tpot = f"{1e3 * r['tpot_s']:.0f}" if r["tpot_s"] is not None else "?"
        lines.append(f"| {'compiled' if r['compiled'] else 'eager'} | {r['kv_cache_dtype']} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {r['requests_per_s']:.3f} | {ttft} | "
                     f"{tpot} | {r['preemptions']} | {r['kv_tokens']:,} |")
    return "\n".join(lines)


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
    ap.add_argument("--kv-budget-mib", type=float, default=None,
                    help="same KV bytes for every dtype (capacity-bound runs); must hold one "
                         "--max-model-len request of auto")
    ap.add_argument("--max-model-len", type=int, default=2048)
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
                            args.new_tokens, args.kv_budget_mib, args.max_model_len))
    md = table(rows, args)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
