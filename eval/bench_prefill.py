"""CPU prefill over the packed cache: the tiled native kernel against decode rows.

One layer, one prompt chunk of ``n`` tokens after ``cached`` tokens already in the cache
(``tests/test_reference.build_cache``, bf16 queries). "decode rows" runs every query token
as a row of one decode call (the block table gathered per row; the path before the tiled
kernel, and the Numba fallback's); "tiled" is ``cpu_ops.prefill``. Both give the same bits
(checked here); timed in interleaved rounds, best of ``--rounds``.

    python eval/bench_prefill.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_reference import build_cache  # noqa: E402

from tq_vllm.kernels import cpu_ops  # noqa: E402

CASES = [("tq4", 3, 0, 1024), ("tq3.5", 3, 0, 2048), ("tq4", 3, 3584, 512),
         ("tq4-qjl", 3, 0, 1024), ("tq4", 7, 0, 1024)]
"""(preset, GQA, cached tokens, chunk tokens); GQA 3: SmolLM2's 3 KV heads, GQA 7: 2."""
SCALE = 0.125


def decode_rows(q, cache, table, s, n, codec, out):
    rows = torch.zeros(n, dtype=torch.long)
    cpu_ops.decode(q, cache, table[rows], torch.arange(s - n + 1, s + 1), codec, SCALE, out)


def tiled(q, cache, table, s, n, codec, out):
    cpu_ops.prefill(q, None, None, cache, table, torch.tensor([s]), torch.tensor([0, n]), 0,
                    codec, SCALE, out, fresh_exact=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| preset | GQA | cached + chunk tokens | decode rows ms | tiled ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, gqa, cached, n in CASES:
        s, kv = cached + n, 3 if gqa == 3 else 2
        codec, cache, table, _, _ = build_cache(name, 64, kv, 16, [s])
        q = torch.randn(n, kv * gqa, 64).to(torch.bfloat16)
        outs = [torch.empty(n, kv * gqa, 64, dtype=torch.bfloat16) for _ in range(2)]
        times = [[], []]
        for _ in range(args.rounds):
            for k, fn in enumerate((decode_rows, tiled)):
                t0 = time.perf_counter()
                fn(q, cache, table, s, n, codec, outs[k])
                times[k].append(time.perf_counter() - t0)
        if not torch.equal(outs[0], outs[1]):
            raise SystemExit(f"{name}: tiled prefill and decode rows differ")
        a, b = (1e3 * min(t) for t in times)
        print(f"| {name} | {gqa} | {cached} + {n} | {a:.1f} | {b:.1f} | {a / b:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
