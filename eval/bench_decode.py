"""Decode-attention kernel benchmark: tq-vllm CPU kernels vs vLLM-CPU's exact attention.

Per decode step (one query token per sequence, one layer), side by side in one run:
our native SIMD kernel (AVX-512 or AVX2) and the Numba fallback for each preset,
vLLM-CPU's ``cpu_attention_with_kv_cache`` on a bf16 cache (what ``--kv-cache-dtype
auto`` runs), and the PyTorch reference. The implementations of one case are timed in
interleaved rounds and each ratio is the median of per-round ratios (these hosts are
noisy). Prints time, ratio vs bf16 and effective GB/s of cache bytes read; writes JSON
and a plot. Presets with the key offset choice get a random offset (every key's flag
is read, as in serving).

A model's decode step reads every layer's cache once, so whether the caches come from
memory or from the last-level cache depends on all layers' bytes together, not one
layer's. Each implementation is therefore timed over distinct caches, one per layer of a
model (``--layers``; by default :data:`MODEL_LAYERS`, fewer where their bf16 caches
would pass :data:`MEMORY_CAP`, which already streams from memory), and reports the time
per layer. So a case is cache-resident exactly when a model's would be on this host:
with the EPYC's 32 MiB L3 nearly every case streams, with the Xeon's 480 MiB L3 the
small ones (batch 1 x 4k: 30 x 2 MiB) stay in L3. ``--layers 1`` times one cache read
over and over (resident in L2/L3: the compute-bound view).

    python eval/bench_decode.py                     # the full grid (minutes)
    python eval/bench_decode.py --quick             # batch 8, context 4k, d 64, GQA 3
    python eval/bench_decode.py --layers 1          # one cache per case (cache-resident)
    python eval/bench_decode.py --impls native,native-amx   # float32 vs tile bodies
    python eval/bench_decode.py --impls native-amx,native-dp   # AMX tiles vs vdpbf16ps (an AMX CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS
from tq_vllm.kernels import cpu_native, cpu_ops
from tq_vllm.reference import tq_paged_attention

BLOCK_SIZE = 128  # vLLM-CPU's default block size
MODEL_LAYERS = 30
"""Distinct caches a case reads in turn by default: SmolLM2-135M's 30 layers."""
MEMORY_CAP = 4 << 30
"""bf16 cache bytes of one case's layers at most (this 24 GiB machine holds the bf16
caches and each preset's beside them); 4 GiB is 8x the largest L3 seen here."""


def default_layers(batch: int, ctx: int, d: int, kv_heads: int) -> int:
    """:data:`MODEL_LAYERS`, or fewer (at least 1) where their bf16 caches would pass
    :data:`MEMORY_CAP`."""
    per_layer = batch * math.ceil(ctx / BLOCK_SIZE) * BLOCK_SIZE * kv_heads * 2 * d * 2
    return max(1, min(MODEL_LAYERS, MEMORY_CAP // per_layer))


def _time_side_by_side(fns, min_time: float = 1.0, max_rounds: int = 30):
    """Per callable: (median seconds, median ratio to the first callable). Rounds call
    every callable once in turn, so a slow spell of a noisy host hits all of them alike;
    a ratio is taken within each round, then the median over rounds."""
    for fn in fns:
        fn()  # warm-up (and jit compile)
    times = [[] for _ in fns]
    t_end = time.perf_counter() + min_time * len(fns)
    while len(times[0]) < 5 or (time.perf_counter() < t_end and len(times[0]) < max_rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    med = (lambda xs: sorted(xs)[len(xs) // 2])
    return [(med(ts), med([t / t0 for t, t0 in zip(ts, times[0])])) for ts in times]


def _bf16_case(batch, ctx, d, kv_heads, gqa, layers=1):
    """vLLM-CPU's decode over ``layers`` distinct bf16 caches in turn; (run, bytes per layer)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    nb = batch * math.ceil(ctx / BLOCK_SIZE)
    caches = [torch.randn(nb, kv_heads, BLOCK_SIZE * 2, d, dtype=torch.bfloat16).chunk(2, dim=2)
              for _ in range(layers)]
    table = torch.arange(nb, dtype=torch.int32).reshape(batch, -1)
    seq = torch.full((batch,), ctx, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    q = torch.randn(batch, kv_heads * gqa, d, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    isa = _get_attn_isa(torch.bfloat16, BLOCK_SIZE, d, "auto")
    meta = ops.cpu_attn_get_scheduler_metadata(batch, kv_heads * gqa, kv_heads, d, seq,
                                               torch.bfloat16, qsl, True, -1, isa, True)

    def run():
        for kc, vc in caches:
            ops.cpu_attention_with_kv_cache(q, kc, vc, out, qsl, seq, 1 / math.sqrt(d), True,
                                            None, -1, table, 0.0, meta, None)
    return run, nb * kv_heads * BLOCK_SIZE * 2 * d * 2 * ctx / (math.ceil(ctx / BLOCK_SIZE) * BLOCK_SIZE)


def _numba_decode(*args):
    cpu_native.load.cache_clear()
    os.environ[cpu_native.DISABLE_ENV] = "1"
    try:
        cpu_ops.decode(*args)
    finally:
        del os.environ[cpu_native.DISABLE_ENV]
        cpu_native.load.cache_clear()


def _reference_decode(q, cache, table, seq, codec, scale, out):
    qsl = torch.arange(q.shape[0] + 1)
    out.copy_(tq_paged_attention(q, cache, table, seq, qsl, codec, scale))


AMX_MODES = {"native": (0, None), "native-amx": (2, False), "native-dp": (2, True)}
"""(tile-body mode, engine) of the native kernel's implementations: its float32 bodies; its
tile bodies for every GQA width (bf16 queries) on the CPU's own engine — AMX tiles where it
has them, else vdpbf16ps; and the tile bodies on vdpbf16ps even where AMX tiles exist
(``TQ_VLLM_CPU_AMX=dp``). A CPU without what an implementation needs stops the run."""


def _tq_case(preset, batch, ctx, d, kv_heads, gqa, impl, layers=1):
    """Our decode (``impl``) over ``layers`` distinct packed caches in turn; (run, bytes per
    layer)."""
    offset = torch.randn(kv_heads, d) if PRESETS[preset].transform.key_offset_choice else None
    codec = LayerCodec.create(PRESETS[preset], d, kv_heads, key_offset=offset)
    slot = PRESETS[preset].layout(d).slot_bytes
    nb = batch * math.ceil(ctx / BLOCK_SIZE)
    lay = PRESETS[preset].layout(d)
    caches = []
    for _ in range(layers):
        # random bytes are valid codes; norms must be finite fp16: write small ones
        cache = torch.randint(0, 256, (nb, kv_heads, BLOCK_SIZE, slot), dtype=torch.uint8)
        for t in (lay.key, lay.value):
            n = t.norms
            cache[..., n.offset:n.end] = torch.full((n.nbytes // 2,), 1.0,
                                                    dtype=torch.float16).view(torch.uint8)
        caches.append(cache)
    table = torch.arange(nb, dtype=torch.int32).reshape(batch, -1)
    seq = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, kv_heads * gqa, d, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    fn = cpu_ops.decode if impl in AMX_MODES else {"numba": _numba_decode,
                                                    "reference": _reference_decode}[impl]
    amx, dp = AMX_MODES.get(impl, (None, None))
    if amx is not None:
        dp = dp or not cpu_native._cpu_has_amx()  # native-amx: the CPU's own engine
        if cpu_native.set_amx(amx, dp=dp) != amx:
            raise SystemExit(f"{impl}: this CPU or build lacks its tile bodies (AVX-512 with "
                             f"AVX512-BF16 and VBMI{'' if dp else ', AMX-BF16'}); drop it from "
                             "--impls")

    def run():
        if amx is not None:
            cpu_native.set_amx(amx, dp=dp)
        for cache in caches:
            fn(q, cache, table, seq, codec, 1 / math.sqrt(d), out)
    return run, batch * ctx * kv_heads * slot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", default="tq4,tq3.5,tq3,tq2.5,tq4-qjl,tq3-qjl")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--gqa", default="3,7")
    ap.add_argument("--impls", default="native,numba,reference",
                    help="our implementations to time beside vLLM's bf16 attention: native "
                         "(float32 bodies), native-amx (tile bodies on the CPU's own engine), "
                         "native-dp (tile bodies on vdpbf16ps), numba, reference")
    ap.add_argument("--reference-max-ctx", type=int, default=4096, help="skip the slow reference beyond")
    ap.add_argument("--layers", type=int, default=0,
                    help="distinct caches per case, timed in turn (0: enough to stream, see above)")
    ap.add_argument("--out", default="eval/results/bench_decode")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.head_dims, args.gqa = "8", "4096", "64", "3"
    kv_heads = 2
    rows = []
    grid = [(b, c, d, g) for d in map(int, args.head_dims.split(",")) for g in map(int, args.gqa.split(","))
            for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))]
    try:
        from tqdm import tqdm
        grid_iter = tqdm(grid, desc="decode bench")
    except ImportError:
        grid_iter = grid
    for b, c, d, g in grid_iter:
        if b * c > 32 * 16384:  # keep memory and time bounded on a 24 GiB machine
            continue
        nl = args.layers or default_layers(b, c, d, kv_heads)
        cases = [("vllm-cpu bf16", "auto", *_bf16_case(b, c, d, kv_heads, g, nl))]
        for p in args.presets.split(","):
            for impl in args.impls.split(","):
                if impl == "reference" and c > args.reference_max_ctx:
                    continue
                cases.append((f"tq {impl}", p, *_tq_case(p, b, c, d, kv_heads, g, impl, nl)))
        timed = _time_side_by_side([run for _, _, run, _ in cases])
        for (impl, p, _, nbytes), (t, ratio) in zip(cases, timed):
            rows.append(dict(impl=impl, preset=p, batch=b, ctx=c, head_dim=d, gqa=g, layers=nl,
                             ms=t * 1e3 / nl, gbps=nbytes * nl / t / 1e9, vs_bf16=ratio))
        del cases
    print(f"{'impl':<14}{'preset':<9}{'B':>4}{'ctx':>7}{'d':>5}{'gqa':>4}{'layers':>7}"
          f"{'ms/layer':>10}{'GB/s':>8}{'t/t_bf16':>10}")
    for r in rows:
        print(f"{r['impl']:<14}{r['preset']:<9}{r['batch']:>4}{r['ctx']:>7}{r['head_dim']:>5}{r['gqa']:>4}"
              f"{r['layers']:>7}{r['ms']:>10.3f}{r['gbps']:>8.2f}{r['vs_bf16']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out.with_suffix(".png"))
    return 0


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r["impl"], r["preset"]) for r in rows if r["impl"] != "vllm-cpu bf16"})
    for impl, preset in keys:
        pts = sorted((r["ctx"], r["vs_bf16"]) for r in rows if (r["impl"], r["preset"]) == (impl, preset)
                     and r["batch"] == max(x["batch"] for x in rows))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{impl} {preset}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode time / vLLM-CPU bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
