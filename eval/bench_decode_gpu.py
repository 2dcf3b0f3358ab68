"""Decode-attention kernel benchmark on a CUDA GPU: our Triton kernel vs exact bf16 attention.

Per decode step (one query token per sequence, one layer), side by side in one run:
the Triton decode kernel reading the packed cache for each preset, and FlashAttention
(PyTorch's ``scaled_dot_product_attention`` flash backend, GQA) on a dense bf16 cache
of the same context — an optimistic bf16 baseline, since it reads contiguous K/V with
no block table. Prints time, ratio vs bf16, effective GB/s of cache bytes read and
that bandwidth as a fraction of the device's peak; writes JSON and a plot.

    python eval/bench_decode_gpu.py                 # the full grid (a few minutes)
    python eval/bench_decode_gpu.py --quick         # batch 8, context 4k/32k, d 128, GQA 4
    python eval/bench_decode_gpu.py --sweep         # launch constants of triton_ops, one case
    python eval/bench_decode_gpu.py --prefill       # chunked prefill over the packed cache
    python eval/bench_decode_gpu.py --graph         # time CUDA-graph replays (as vLLM decodes)
    python eval/bench_decode_gpu.py --store         # the store kernel (scalar, feedback, trellis)

Needs only PyTorch with CUDA and Triton (no vLLM): ``kernels/`` never imports vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS
from tq_vllm.kernels import triton_ops

BLOCK_SIZE = 16  # vLLM's default block size on CUDA
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0}
"""Datasheet HBM bandwidth (GB/s) by device-name substring, for the fraction of peak."""


def _peak_gbps() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _graphed(fn):
    """``fn`` captured once in a CUDA graph (after warm-up on a side stream); returns the
    replay. vLLM serves GPU decode from CUDA graphs, so the launchers' Python and launch
    cost (~0.2 ms per step here, several kernels) is out of what a replay times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _bf16_case(batch, ctx, d, kv_heads, gqa):
    """FlashAttention over a dense bf16 cache: q [B, Hq, 1, d], K/V [B, H, ctx, d]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    k = torch.randn(batch, kv_heads, ctx, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch, kv_heads * gqa, 1, d, dtype=torch.bfloat16, device="cuda")

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run, 2 * k.numel() * k.element_size()


def _codec(preset: str, d: int, kv_heads: int) -> LayerCodec:
    """The preset's codec with every calibrated part a run would have, drawn at random:
    outlier halves, a key offset (so decode reads the offset flags) and a query second
    moment for keys that round with feedback (so the store runs that search)."""
    p = PRESETS[preset]
    gen = torch.Generator().manual_seed(d + kv_heads)
    perms = [torch.stack([torch.randperm(d, generator=gen) for _ in range(kv_heads)])
             if p.transform.calibrated_split and c.split else None for c in (p.key, p.value)]
    offset = 0.5 * torch.randn(kv_heads, d, generator=gen) if p.transform.key_offset_choice else None
    weight = None
    if p.key.feedback:
        a = torch.randn(kv_heads, d, d, generator=gen) * torch.logspace(-1, 1, d)
        weight = a @ a.mT / d
    return LayerCodec.create(p, d, kv_heads, layer=3, key_perm=perms[0], value_perm=perms[1],
                             key_offset=offset, key_query_weight=weight).to("cuda")


def _tq_case(preset, batch, ctx, d, kv_heads, gqa):
    """Our Triton decode over a packed paged cache filled with valid random slots."""
    lay = PRESETS[preset].layout(d)
    codec = _codec(preset, d, kv_heads)
    per_seq = math.ceil(ctx / BLOCK_SIZE)
    nb = batch * per_seq
    cache = torch.randint(0, 256, (nb, kv_heads, BLOCK_SIZE, lay.slot_bytes), dtype=torch.uint8,
                          device="cuda")
    _fill_norms(cache, lay)
    table = torch.randperm(nb, device="cuda", dtype=torch.int64).to(torch.int32).reshape(batch, -1)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, kv_heads * gqa, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)

    def run():
        triton_ops.decode(q, cache, table, seq, codec, 1 / math.sqrt(d), out)
    return run, batch * ctx * kv_heads * lay.slot_bytes


PREFILL_CASES = [("tq3.5", 1, 3584, 512, 128, 4), ("tq3.5", 4, 4096, 256, 128, 4),
                 ("tq4-qjl", 1, 3584, 512, 64, 4), ("tq4", 1, 0, 2048, 128, 7)]
"""(preset, sequences, cached tokens, new tokens per sequence, head_dim, GQA)."""


def _fill_norms(cache, lay) -> None:
    """Random bytes are valid codes; norms must be finite fp16 (here in [0.5, 1.5))."""
    for t in (lay.key, lay.value):
        n = t.norms
        cache[..., n.offset:n.end] = (torch.rand(*cache.shape[:3], n.nbytes // 2, device="cuda")
                                      + 0.5).half().view(torch.uint8)


def prefill(kv_heads: int) -> list[dict]:
    """Time :func:`triton_ops.prefill` (every chunk through the kernel, none fresh-exact)
    against exact bf16 SDPA of the same chunks over dense K/V with a lower-right causal
    mask (expanded to the query heads outside the timing)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    rows = []
    for preset, nseq, cached, chunk, d, gqa in PREFILL_CASES:
        s = cached + chunk
        hq = kv_heads * gqa
        qd = torch.randn(nseq, hq, chunk, d, dtype=torch.bfloat16, device="cuda")
        kd = torch.randn(nseq, hq, s, d, dtype=torch.bfloat16, device="cuda")
        vd = torch.randn_like(kd)
        mask = causal_lower_right(chunk, s)
        t_ref = _time_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask))
        del qd, kd, vd
        lay = PRESETS[preset].layout(d)
        codec = _codec(preset, d, kv_heads)
        nb = nseq * math.ceil(s / BLOCK_SIZE)
        cache = torch.randint(0, 256, (nb, kv_heads, BLOCK_SIZE, lay.slot_bytes),
                              dtype=torch.uint8, device="cuda")
        _fill_norms(cache, lay)
        table = torch.randperm(nb, device="cuda").to(torch.int32).reshape(nseq, -1)
        t = nseq * chunk
        q = torch.randn(t, hq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(t, kv_heads, d, dtype=torch.bfloat16, device="cuda")
        sl = torch.full((nseq,), s, dtype=torch.int32)
        qsl = torch.arange(nseq + 1, dtype=torch.int32) * chunk
        out = torch.empty_like(q)
        t_tq = _time_ms(lambda: triton_ops.prefill(q, k, k, cache, table, sl, qsl, 0, codec,
                                                   1 / math.sqrt(d), out, False))
        rows.append(dict(preset=preset, seqs=nseq, cached=cached, new=chunk, head_dim=d, gqa=gqa,
                         ms=t_tq, sdpa_bf16_ms=t_ref, vs_bf16=t_tq / t_ref))
        print(f"prefill {preset:<8} {nseq} x ({cached} cached + {chunk} new) d{d} GQA {gqa}: "
              f"{t_tq:.3f} ms, SDPA bf16 {t_ref:.3f} ms, {t_tq / t_ref:.2f}x", flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


STORE_TOKENS = (16, 256, 4096)
"""Tokens per store call: a decode step of 16 sequences, a chunk, a long prompt."""


def store(presets: list[str], d: int, kv_heads: int) -> list[dict]:
    """Time :func:`triton_ops.store` (rotation, codes, norms, packing, slot writes) against
    writing the same K/V into a paged bf16 cache by slot (vLLM's ``reshape_and_cache``'s
    work, done here by ``index_copy_``)."""
    rows = []
    for t in STORE_TOKENS:
        k = torch.randn(t, kv_heads, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        nb = math.ceil(t / BLOCK_SIZE) + 1
        slots = torch.randperm(nb * BLOCK_SIZE, device="cuda")[:t]
        dense = torch.zeros(2, nb * BLOCK_SIZE, kv_heads, d, dtype=torch.bfloat16, device="cuda")

        def bf16():
            dense[0].index_copy_(0, slots, k)
            dense[1].index_copy_(0, slots, v)
        t_ref = _time_ms(bf16)
        for p in presets:
            lay = PRESETS[p].layout(d)
            codec = _codec(p, d, kv_heads)
            cache = torch.zeros(nb, kv_heads, BLOCK_SIZE, lay.slot_bytes, dtype=torch.uint8,
                                device="cuda")
            ms = _time_ms(lambda: triton_ops.store(k, v, cache, slots, codec))
            rows.append(dict(preset=p, tokens=t, head_dim=d, kv_heads=kv_heads, ms=ms,
                             bf16_ms=t_ref, vs_bf16=ms / t_ref,
                             us_per_token=1e3 * ms / t))
            print(f"store {p:<14} {t:>5} tokens d{d}: {ms:.4f} ms ({1e3 * ms / t:.2f} us/token), "
                  f"bf16 slot write {t_ref:.4f} ms, {ms / t_ref:.1f}x", flush=True)
    return rows


def sweep(preset: str, batch: int, ctx: int, d: int, kv_heads: int, gqa: int) -> list[dict]:
    """Time one case over the decode launch constants (tokens per tile, warps, pipeline
    stages)."""
    run, _ = _bf16_case(batch, ctx, d, kv_heads, gqa)
    t_bf16 = _time_ms(run)
    saved = (dict(triton_ops.DECODE_BLOCK_N), dict(triton_ops.DECODE_NUM_WARPS),
             triton_ops.DECODE_NUM_STAGES, triton_ops.DOT_PRECISION[torch.bfloat16])
    rows = []
    try:
        for block_n in (16, 32, 64):
            for warps in (2, 4, 8):
                for stages in (1, 3):
                    triton_ops.DECODE_BLOCK_N[d] = block_n
                    triton_ops.DECODE_NUM_WARPS[d] = warps
                    triton_ops.DECODE_NUM_STAGES = stages
                    run, nbytes = _tq_case(preset, batch, ctx, d, kv_heads, gqa)
                    t = _time_ms(run)
                    rows.append(dict(preset=preset, block_n=block_n, warps=warps, stages=stages,
                                     prec=saved[3], ms=t, gbps=nbytes / t / 1e6, vs_bf16=t / t_bf16))
                    print(f"{preset} B{batch} ctx{ctx} d{d} block_n {block_n:>3} warps {warps} "
                          f"stages {stages}: {t:.4f} ms  {nbytes / t / 1e6:7.0f} GB/s  "
                          f"{t / t_bf16:6.2f}x bf16", flush=True)
        best = min(rows, key=lambda r: r["ms"])
        triton_ops.DECODE_BLOCK_N[d], triton_ops.DECODE_NUM_WARPS[d] = best["block_n"], best["warps"]
        triton_ops.DECODE_NUM_STAGES = best["stages"]
        for prec in ("ieee", "tf32x3", "tf32"):
            triton_ops.DOT_PRECISION[torch.bfloat16] = prec  # the benchmark's queries are bf16
            run, nbytes = _tq_case(preset, batch, ctx, d, kv_heads, gqa)
            t = _time_ms(run)
            rows.append(dict(best, prec=prec, ms=t, gbps=nbytes / t / 1e6, vs_bf16=t / t_bf16))
            print(f"{preset} best with {prec} dots: {t:.4f} ms  {t / t_bf16:6.2f}x bf16", flush=True)
    finally:
        triton_ops.DOT_PRECISION[torch.bfloat16] = saved[3]
        triton_ops.DECODE_BLOCK_N.clear()
        triton_ops.DECODE_BLOCK_N.update(saved[0])
        triton_ops.DECODE_NUM_WARPS.clear()
        triton_ops.DECODE_NUM_WARPS.update(saved[1])
        triton_ops.DECODE_NUM_STAGES = saved[2]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="tune the launch constants on one case")
    ap.add_argument("--prefill", action="store_true", help="time chunked prefill instead")
    ap.add_argument("--store", action="store_true", help="time the store kernel instead")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays of each decode step (launcher cost excluded)")
    ap.add_argument("--presets", default="tq4,tq3.5,tq3,tq2.5,tq4-qjl,tq3-qjl")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--gqa", default="4,7")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--out", default="eval/results/bench_decode_gpu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_gpu needs a CUDA GPU; on CPU run eval/bench_decode.py")
    if args.sweep:
        rows = [r for p in ("tq3.5", "tq3") for r in sweep(p, 8, 16384, 128, args.kv_heads, 4)]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".sweep.json").write_text(json.dumps(rows, indent=1))
        return 0
    if args.prefill:
        rows = prefill(args.kv_heads)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".prefill.json").write_text(json.dumps(rows, indent=1))
        return 0
    if args.store:
        rows = [r for d in map(int, args.head_dims.split(","))
                for r in store(args.presets.split(","), d, args.kv_heads)]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".store.json").write_text(json.dumps(rows, indent=1))
        return 0
    if args.quick:
        args.batches, args.contexts, args.head_dims, args.gqa = "8", "4096,32768", "128", "4"
    peak = _peak_gbps()
    rows = []
    grid = [(b, c, d, g) for d in map(int, args.head_dims.split(","))
            for g in map(int, args.gqa.split(",")) for b in map(int, args.batches.split(","))
            for c in map(int, args.contexts.split(","))]
    try:
        from tqdm import tqdm
        grid_iter = tqdm(grid, desc="gpu decode bench")
    except ImportError:
        grid_iter = grid
    timed = _graphed if args.graph else (lambda f: f)
    for b, c, d, g in grid_iter:
        run, nbytes = _bf16_case(b, c, d, args.kv_heads, g)
        t_bf16 = _time_ms(timed(run))
        rows.append(dict(impl="flash bf16", preset="auto", batch=b, ctx=c, head_dim=d, gqa=g,
                         ms=t_bf16, gbps=nbytes / t_bf16 / 1e6, vs_bf16=1.0))
        del run
        for p in args.presets.split(","):
            run, nbytes = _tq_case(p, b, c, d, args.kv_heads, g)
            t = _time_ms(timed(run))
            rows.append(dict(impl="tq triton", preset=p, batch=b, ctx=c, head_dim=d, gqa=g,
                             ms=t, gbps=nbytes / t / 1e6, vs_bf16=t / t_bf16))
            del run
        torch.cuda.empty_cache()
    for r in rows:
        r["of_peak"] = r["gbps"] / peak if peak else None
    print(f"device: {torch.cuda.get_device_name()}  peak {peak} GB/s  "
          f"kv_heads {args.kv_heads}  block_size {BLOCK_SIZE}")
    print(f"{'impl':<12}{'preset':<9}{'B':>4}{'ctx':>7}{'d':>5}{'gqa':>4}{'ms':>9}{'GB/s':>8}"
          f"{'%peak':>7}{'t/t_bf16':>10}")
    for r in rows:
        pk = f"{100 * r['of_peak']:>6.0f}%" if r["of_peak"] else "      -"
        print(f"{r['impl']:<12}{r['preset']:<9}{r['batch']:>4}{r['ctx']:>7}{r['head_dim']:>5}"
              f"{r['gqa']:>4}{r['ms']:>9.4f}{r['gbps']:>8.0f}{pk}{r['vs_bf16']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), peak_gbps=peak, kv_heads=args.kv_heads,
                block_size=BLOCK_SIZE, torch=torch.__version__, cuda_graph=args.graph)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
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
    big = max(r["batch"] for r in rows)
    d, g = max(r["head_dim"] for r in rows), min(r["gqa"] for r in rows)
    for p in sorted({r["preset"] for r in rows if r["impl"] == "tq triton"}):
        pts = sorted((r["ctx"], r["vs_bf16"]) for r in rows if r["preset"] == p
                     and r["batch"] == big and r["head_dim"] == d and r["gqa"] == g)
        ax.plot(*zip(*pts), marker="o", label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode time / FlashAttention bf16")
    ax.set_title(f"batch {big}, head_dim {d}, GQA {g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
