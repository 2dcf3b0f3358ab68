"""CPU prefill over the packed cache: the tiled native kernel against decode rows.

One layer, one prompt chunk of ``n`` tokens after ``cached`` tokens already in the cache
(``tests/test_reference.build_cache``, bf16 queries). "decode rows" runs every query token
as a row of one decode call (the block table gathered per row; the path before the tiled
kernel, and the Numba fallback's); "tiled" is ``cpu_ops.prefill``. Both give the same bits
(checked here), on the native kernel's float32 bodies and, where the CPU has AMX, on its AMX
bodies ("... AMX", every GQA width); timed in interleaved rounds, best of ``--rounds``.

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

from tq_vllm.kernels import cpu_native, cpu_ops  # noqa: E402

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
    amx = cpu_native.set_amx(2) == 2  # AMX bodies for every GQA width, where there
    runs = [("decode rows", 0, decode_rows), ("tiled", 0, tiled)]
    runs += [("decode rows AMX", 2, decode_rows), ("tiled AMX", 2, tiled)] if amx else []
    print("| preset | GQA | cached + chunk tokens | " + " | ".join(f"{r[0]} ms" for r in runs)
          + " | tiled speed-up" + (" | AMX speed-up (tiled) |" if amx else " |"))
    print("|---" * (3 + len(runs) + 1 + amx) + "|")
    for name, gqa, cached, n in CASES:
        s, kv = cached + n, 3 if gqa == 3 else 2
        codec, cache, table, _, _ = build_cache(name, 64, kv, 16, [s])
        q = torch.randn(n, kv * gqa, 64).to(torch.bfloat16)
        outs = [torch.empty(n, kv * gqa, 64, dtype=torch.bfloat16) for _ in runs]
        times = [[] for _ in runs]
        for _ in range(args.rounds):
            for k, (_, mode, fn) in enumerate(runs):
                cpu_native.set_amx(mode)
                t0 = time.perf_counter()
                fn(q, cache, table, s, n, codec, outs[k])
                times[k].append(time.perf_counter() - t0)
        for a in range(0, len(runs), 2):  # each body's tiled prefill gives its decode rows' bits
            if not torch.equal(outs[a], outs[a + 1]):
                raise SystemExit(f"{name}: {runs[a + 1][0]} and {runs[a][0]} differ")
        ms = [1e3 * min(t) for t in times]
        cols = " | ".join(f"{m:.1f}" for m in ms)
        ratios = f"{ms[0] / ms[1]:.2f}×" + (f" | {ms[1] / ms[3]:.2f}×" if amx else "")
        print(f"| {name} | {gqa} | {cached} + {n} | {cols} | {ratios} |", flush=True)
    cpu_native.set_amx(cpu_native.amx_default())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
