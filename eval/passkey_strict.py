"""Pass-key retrieval of codec variants in transformers, measured continuously.

The lm-eval pass-key task (``eval/tasks/tq_passkey.yaml``) scores 0 or 1 per prompt, and
a 135M model finds a key with a first-token margin of under one nat even with exact
attention, so a 0/5 says little about *how far* a preset is from retrieving. This script
runs the same prompts (``retrieval_data.passkey_records``) through the strict-mode
emulation of ``ppl_strict.py`` (every layer's K and V encoded and decoded; the same
variant syntax, ``@sink=N`` included) and reports per variant:

- ``greedy``: prompts whose greedy continuation starts with the key (teacher forcing:
  the argmax at every answer position is the answer's token);
- ``logp``: mean log-probability of the whole answer " NNNNN";
- ``margin``: per prompt, log p(first answer token) − log p(best other token);
  negative = the model says something else first.

    python eval/passkey_strict.py --model smollm2 --lengths 1024 tq4 tq4@sink=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppl_strict  # noqa: E402
from retrieval_data import passkey_records  # noqa: E402

from tq_vllm.tools import hf_attention  # noqa: E402
from tq_vllm.tools.calibrate import calibration_token_chunks  # noqa: E402


@torch.no_grad()
def answer_scores(model, prompt_ids: list[int], answer_ids: list[int]) -> dict:
    """Teacher-forced scores of ``answer_ids`` after ``prompt_ids`` (see module doc)."""
    ids = torch.tensor(prompt_ids + answer_ids)[None]
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
    target = torch.tensor(answer_ids)
    first = logp[pos[0]].clone()
    t = float(first[target[0]])
    first[target[0]] = -float("inf")
    return {"logp": float(logp[pos, target].sum()), "margin": t - float(first.max()),
            "greedy": bool((logp[pos].argmax(-1) == target).all())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="ppl_strict.py variants; auto is always run")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="1024", help="comma-separated prompt lengths (tokens)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="prompt sets (5 depths each; seed s: its own keys and haystack)")
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    tok, model, head_dim = ppl_strict.load_model(args.model)
    lengths = [int(n) for n in args.lengths.split(",")]
    records = [r for seed in range(args.seeds) for r in passkey_records(tok, lengths, seed=seed)]
    with hf_attention.capture(model) as calib:
        for chunk in calibration_token_chunks(tok, args.calib_chunks, 1024):
            model(chunk[None])
    specs = ["auto"] + [s for s in args.variants if s != "auto"]
    if any("trellis" in s for s in specs):  # the CPU kernel's searches, bit-identical
        ppl_strict.use_native_trellis_search()
    rows = []
    for spec in specs:
        t0 = time.time()
        with ppl_strict.run_variant(model, ppl_strict.parse_variant(spec), head_dim, calib):
            for rec in records:
                s = answer_scores(model, tok(rec["prompt"], add_special_tokens=False).input_ids,
                                  tok(" " + rec["answer"], add_special_tokens=False).input_ids)
                rows.append({"variant": spec, "length": rec["length"], "depth": rec["depth"], **s})
        for length in sorted({r["length"] for r in records}):
            mine = [r for r in rows if r["variant"] == spec and r["length"] == length]
            print(f"{spec:<30} len {length:5d}  greedy {sum(r['greedy'] for r in mine)}/{len(mine)}"
                  f"  logp {sum(r['logp'] for r in mine) / len(mine):6.2f}  margin "
                  + " ".join(f"{r['margin']:+.2f}" for r in mine)
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
