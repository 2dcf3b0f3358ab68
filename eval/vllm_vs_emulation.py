"""The same tokens through the strict emulation (transformers, ``eval/ppl_strict.py``) and
through vLLM in strict mode: does the serving path lose what the emulation says it loses?

For each of the first ``--docs`` essays that are ``--tokens`` long, the per-token negative
log-likelihood under ``auto`` and each ``--dtypes`` preset, from transformers with the
codec's encode → decode on every layer's K/V, and from vLLM's prompt log-probabilities
(the prompt as token ids, model in float32, the plugin selected by ``kv_cache_dtype``).
``auto`` must agree to float noise; a preset's Δ perplexity per document should agree
within the spread of quantization noise (two float orders flip different codes, and the
flips compound through the layers, so each path draws its own realization of the noise;
``eval/ppl_strict.py --realizations N`` averages the emulation over N such draws).

    python eval/vllm_vs_emulation.py [--model smollm2] [--docs 8] [--dtypes tq4]

Prints per-document Δ perplexity of both paths, their means and the paired difference;
writes JSON with the per-token values.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def emulation_nll(model_name: str, dtypes: list[str], docs: int, tokens: int):
    """(documents, {dtype: per-document per-token NLL}) from the transformers emulation."""
    import torch

    import ppl_strict
    from textdata import paul_graham_essays
    from tq_vllm.tools.calibrate import model_calibration
    from tq_vllm.tools.models import fetch_model

    tok, model, head_dim = ppl_strict.load_model(model_name)
    ds, _ = ppl_strict.essay_docs(tok, paul_graham_essays(), docs, tokens)
    calib = model_calibration(fetch_model(model_name))  # the statistics the vLLM backend loads
    res = {}
    for dt in dtypes:
        variant = ppl_strict.parse_variant(dt)
        with torch.no_grad(), ppl_strict.run_variant(model, variant, head_dim, calib):
            res[dt] = [(-ppl_strict.doc_logprobs(model, ids).gather(-1, ids[1:, None])[:, 0]).tolist()
                       for ids in ds]
    return ds, res


def vllm_nll(model_name: str, dtypes: list[str], ds) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tq_vllm.tools.models import fetch_model

    res = {}
    for dt in dtypes:
        llm = LLM(model=str(fetch_model(model_name)), kv_cache_dtype=dt, dtype="float32",
                  enforce_eager=True, max_model_len=max(len(d) for d in ds) + 16, seed=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=d.tolist()) for d in ds],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True)
        res[dt] = [[-e[t].logprob for t, e in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
                   for o in outs]
        del llm
        gc.collect()
    return res


def delta_ppl(nll: list[float], base: list[float]) -> float:
    """Δ perplexity in percent of one document."""
    return 100 * (math.exp((sum(nll) - sum(base)) / len(base)) - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="tq4")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("eval/results/vllm_vs_emulation.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dtypes = ["auto", *args.dtypes.split(",")]
    ds, emu = emulation_nll(args.model, dtypes, args.docs, args.tokens)
    vl = vllm_nll(args.model, dtypes, ds)
    auto_gap = max(abs(a - b) for x, y in zip(emu["auto"], vl["auto"]) for a, b in zip(x, y))
    print(f"auto: largest per-token |NLL difference| vLLM vs emulation {auto_gap:.2e} nats")
    for dt in dtypes[1:]:
        e = [delta_ppl(x, b) for x, b in zip(emu[dt], emu["auto"])]
        v = [delta_ppl(x, b) for x, b in zip(vl[dt], vl["auto"])]
        diff = [b - a for a, b in zip(e, v)]
        se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        print(f"{dt}: Δ ppl per document, emulation / vLLM: "
              + ", ".join(f"{a:+.2f}/{b:+.2f}" for a, b in zip(e, v)))
        print(f"{dt}: mean emulation {statistics.mean(e):+.2f}%, vLLM {statistics.mean(v):+.2f}%, "
              f"paired difference {statistics.mean(diff):+.2f} ± {se:.2f} pt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "emulation": emu, "vllm": vl}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
