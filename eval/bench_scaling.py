"""Time per output token against context length through vLLM, ``auto`` beside tq presets,
with the KV memory each one holds.

For each context length L (default: 1k, 2k, 4k and the longest the model takes, up to 8k)
a batch of ``--batch`` prompts of exactly L tokens is sent twice: once to fill the cache,
then timed with the prompts prefix-cached, so the timed pass is decode (each prompt's last
block is recomputed) and time per output token (TPOT, vLLM's per-request timestamps) is the
decode step at that context. One engine per dtype, lengths in increasing order.

Memory report per dtype: the bytes one token's K and V take over all layers and KV heads,
split into codes, QJL signs, norms and padding (the preset's slot layout; ``auto`` stores
K and V in the model's dtype), against bf16; and the KV bytes vLLM actually allocated (the
workers' cache tensors) with the tokens they hold.

    python eval/bench_scaling.py [--model smollm2] [--dtypes auto,tq4] [--batch 2] \
        [--lengths 1024,2048,4096,8000] [--new-tokens 32] [--model-dtype float32]

Writes JSON, markdown and a plot (TPOT vs context, one line per dtype; ratio to ``auto``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import MODEL_DTYPE_BYTES, _mean, kv_bytes  # noqa: E402


def _worker_kv_bytes(worker) -> int:
    """Bytes of the KV cache tensors one worker holds (shared storage counted once)."""
    seen, total = set(), 0
    stack = list(worker.model_runner.kv_caches)
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):
            stack.extend(t)
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def prompt_ids(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` random token ids (no shared prefix)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab - 1000, (n, length), generator=g).tolist()


def run(model: str, dtype: str, lengths: list[int], batch: int, new_tokens: int,
        model_dtype: str, compiled: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.loads((Path(model) / "config.json").read_text())
    llm = LLM(model=model, kv_cache_dtype=dtype, dtype=model_dtype, seed=0,
              max_model_len=max(lengths) + new_tokens, enforce_eager=not compiled,
              disable_log_stats=False)
    cache = llm.llm_engine.vllm_config.cache_config
    row = {"kv_cache_dtype": dtype, "model_dtype": model_dtype, "compiled": compiled,
           "attention": os.environ.get("TQ_VLLM_ATTENTION", "strict"),
           "kv_tokens": cache.num_gpu_blocks * cache.block_size,
           "bytes_per_token": kv_bytes(model, dtype, model_dtype),
           "allocated_kv_bytes": sum(llm.collective_rpc(_worker_kv_bytes)), "points": []}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, length in enumerate(lengths):
        ps = [TokensPrompt(prompt_token_ids=ids)
              for ids in prompt_ids(batch, length, cfg["vocab_size"], seed=i)]
        llm.generate(ps, SamplingParams(max_tokens=1), use_tqdm=False)  # fill the cache
        outs = llm.generate(ps, params, use_tqdm=True)
        stats = [o.metrics for o in outs if o.metrics is not None]
        tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
                for m in stats if m.num_generation_tokens > 1]
        row["points"].append({"context": length, "tpot_s": _mean(tpot),
                              "ttft_s": _mean([m.first_token_latency for m in stats])})
        print(f"[scaling] {dtype} context {length}: TPOT {1e3 * row['points'][-1]['tpot_s']:.1f} ms",
              flush=True)
    del llm
    gc.collect()
    return row


def table(rows: list[dict], args) -> str:
    auto = next((r for r in rows if r["kv_cache_dtype"] == "auto"), None)
    lengths = [p["context"] for p in rows[0]["points"]]
    head = "| kv-cache-dtype | " + " | ".join(f"TPOT ms @ {n}" for n in lengths) + " |"
    lines = [f"batch {args.batch}, {args.new_tokens} new tokens, model in {args.model_dtype}; "
             "in brackets: ratio to auto", "", head, "|---" * (len(lengths) + 1) + "|"]
    for r in rows:
        cells = []
        for k, p in enumerate(r["points"]):
            cell = f"{1e3 * p['tpot_s']:.1f}"
            if auto and r is not auto:
                cell += f" ({p['tpot_s'] / auto['points'][k]['tpot_s']:.2f})"
            cells.append(cell)
        lines.append(f"| {r['kv_cache_dtype']} | " + " | ".join(cells) + " |")
    lines += ["", "KV memory, bytes per token over all layers and KV heads, and what vLLM allocated:",
              "", "| kv-cache-dtype | codes | signs | norms | padding | total | vs bf16 | "
              "KV tokens | allocated MiB | allocated / (tokens × total) |", "|---" * 10 + "|"]
    for r in rows:
        b = r["bytes_per_token"]
        held = r["kv_tokens"] * b["total"]
        lines.append(f"| {r['kv_cache_dtype']} | {b['codes']:,} | {b['signs']:,} | {b['norms']:,} | "
                     f"{b['padding']:,} | {b['total']:,} | {b['bf16'] / b['total']:.2f}× | "
                     f"{r['kv_tokens']:,} | {r['allocated_kv_bytes'] / 2**20:,.1f} | "
                     f"{r['allocated_kv_bytes'] / held:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.8))
    auto = next((r for r in rows if r["kv_cache_dtype"] == "auto"), None)
    for r in rows:
        xs = [p["context"] for p in r["points"]]
        ax.plot(xs, [1e3 * p["tpot_s"] for p in r["points"]], "o-", label=r["kv_cache_dtype"])
        if auto and r is not auto:
            bx.plot(xs, [p["tpot_s"] / a["tpot_s"] for p, a in zip(r["points"], auto["points"])],
                    "o-", label=r["kv_cache_dtype"])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per output token (ms)")
    ax.legend(fontsize=8)
    bx.axhline(1.0, color="k", lw=0.8)
    bx.set_xlabel("context (tokens)")
    bx.set_ylabel("TPOT / auto's TPOT")
    bx.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="auto,tq4")
    ap.add_argument("--lengths", default=None, help="comma list of context lengths (tokens)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--model-dtype", default="float32", choices=sorted(MODEL_DTYPE_BYTES))
    ap.add_argument("--compiled", action="store_true", help="torch.compile (default: eager)")
    ap.add_argument("--out", default="eval/results/bench_scaling.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc callable
    from tq_vllm.tools.models import fetch_model

    model = str(fetch_model(args.model))
    cfg = json.loads((Path(model) / "config.json").read_text())
    top = min(cfg.get("max_position_embeddings", 8192), 8192) - args.new_tokens - 16
    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths
               else sorted({n for n in (1024, 2048, 4096) if n < top} | {top // 16 * 16}))
    rows = []
    for dtype in args.dtypes.split(","):
        print(f"[scaling] {dtype} ...", flush=True)
        rows.append(run(model, dtype, lengths, args.batch, args.new_tokens, args.model_dtype,
                        args.compiled))
    md = table(rows, args)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    plot(rows, md.splitlines()[0], out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
