"""Decode speed on a GPU: our Triton kernel beside vLLM's own Triton kernels.

Per decode step (one layer, block size 16, each step captured in a CUDA graph and timed by
replays, as vLLM serves GPU decode), side by side in one run: FlashAttention on a dense
bf16 cache (PyTorch SDPA, the optimistic exact baseline of ``bench_decode_gpu.py``),
vLLM 0.32's ``unified_attention`` on a paged bf16 cache (its ``TRITON_ATTN`` backend's
kernel, called as that backend calls it for a decode batch: K/V halves of one cache
tensor, 16 softmax segments below its 3D threshold), our ``triton_ops.decode`` for
``--ours`` presets, and vLLM 0.32's ``triton_turboquant_decode_attention`` (stage 1 + 2,
its launcher unchanged: 32 KV splits, one program per query head) for ``--intree``
presets, on random valid caches. Prints ms per step, ratio to FlashAttention and
effective GB/s of cache read; writes JSON.

    python eval/bench_intree_gpu.py                          # vLLM importable
    python eval/bench_intree_gpu.py --vllm-src DIR           # DIR: a vLLM 0.32 ``vllm`` folder

With ``--vllm-src`` only vLLM's kernel files are loaded from DIR (its package ``__init__``
and platform code are not: ``vllm.platforms`` and ``vllm.triton_utils`` are replaced by
two small stand-ins naming CUDA and the real Triton), which is how it runs on a GPU machine
without a CUDA vLLM wheel. ``--smoke`` runs one tiny case on CPU tensors under
``TRITON_INTERPRET=1`` (no timing) to check the set-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOCK_SIZE = 16
INTREE_SPLITS = 32  # vLLM's max_num_kv_splits default


def _load_vllm_kernels(src: str | None):
    """(in-tree decode launcher, TurboQuantConfig, get_centroids, unified_attention) from
    vLLM, or from the ``vllm`` folder ``src`` with stand-ins for its platform, Triton
    wrappers, environment, logger and the one enum the kernels read from
    ``kv_cache_interface``."""
    if src is None:
        import vllm.triton_utils  # noqa: F401
        from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
        from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
        from vllm.v1.attention.ops.triton_turboquant_decode import (
            triton_turboquant_decode_attention)
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
        return triton_turboquant_decode_attention, TurboQuantConfig, get_centroids, unified_attention
    import enum
    import logging

    import triton
    import triton.language as tl

    root = Path(src)
    pkg = types.ModuleType("vllm")
    pkg.__path__ = [str(root)]
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(
        is_rocm=lambda: False, is_cuda_alike=torch.cuda.is_available, is_cuda=torch.cuda.is_available,
        fp8_dtype=lambda: torch.float8_e4m3fn, is_device_capability_family=lambda _: False)
    tutils = types.ModuleType("vllm.triton_utils")
    tutils.triton, tutils.tl = triton, tl
    envs = types.ModuleType("vllm.envs")
    envs.VLLM_BATCH_INVARIANT = False
    logger = types.ModuleType("vllm.logger")
    logger.init_logger = logging.getLogger
    kvi = types.ModuleType("vllm.v1.kv_cache_interface")
    kvi.KVQuantMode = enum.IntEnum("KVQuantMode", [  # vLLM 0.32's values, in its order
        ("NONE", 0), ("FP8_PER_TENSOR", 1), ("INT8_PER_TOKEN_HEAD", 2),
        ("FP8_PER_TOKEN_HEAD", 3), ("INT4_PER_TOKEN_HEAD", 4), ("NVFP4", 5)])
    sys.modules.update({"vllm": pkg, "vllm.platforms": platforms, "vllm.triton_utils": tutils,
                        "vllm.envs": envs, "vllm.logger": logger,
                        "vllm.v1.kv_cache_interface": kvi})

    def by_path(name: str, rel: str):
        spec = importlib.util.spec_from_file_location(name, root / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    tq = "model_executor/layers/quantization/turboquant"
    cfg = by_path("vllm_tq_config", f"{tq}/config.py")
    cent = by_path("vllm_tq_centroids", f"{tq}/centroids.py")
    from vllm.v1.attention.ops.triton_turboquant_decode import (
        triton_turboquant_decode_attention)
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    return (triton_turboquant_decode_attention, cfg.TurboQuantConfig, cent.get_centroids,
            unified_attention)


TRITON_ATTN_SEGMENTS = 16  # vLLM 0.32 triton_attn.NUM_PAR_SOFTMAX_SEGMENTS
TRITON_ATTN_MIN_GRID = 128  # vLLM 0.32 triton_attn.MIN_LAUNCH_GRID_SIZE_2D


def _vllm_triton_case(kernels, batch, ctx, d, kv_heads, gqa, device, dtype=torch.bfloat16):
    """vLLM's ``unified_attention`` decoding from a paged bf16 cache, with the arguments its
    ``TRITON_ATTN`` backend passes for a decode batch: one cache tensor
    ``[blocks, H, 16, 2·d]`` seen as ``[blocks, 16, H, d]`` K and V halves, unit descales,
    the 3D (16-segment) kernel up to ``128 // H`` sequences and the 2D one above (its
    threshold with CUDA graphs moves to the nearest capture size, which for 8 KV heads is
    16 itself). Returns (run, bytes of K/V read per step); ``run.inputs`` are (q, K, V,
    block table)."""
    unified_attention = kernels[3]
    nb = batch * math.ceil(ctx / BLOCK_SIZE)
    cache = torch.randn(nb, kv_heads, BLOCK_SIZE, 2 * d, dtype=dtype, device=device)
    key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)
    table = torch.randperm(nb, device=device).to(torch.int32).reshape(batch, -1)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    hq = kv_heads * gqa
    q = torch.randn(batch, hq, d, dtype=dtype, device=device)
    out = torch.empty_like(q)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    descale = torch.ones(1, dtype=torch.float32, device=device).expand(batch, kv_heads)
    threshold = TRITON_ATTN_MIN_GRID // kv_heads
    dpad = 1 << (d - 1).bit_length()  # head size padded to a power of 2, as vLLM's
    segm_out = torch.empty(threshold, hq, TRITON_ATTN_SEGMENTS, dpad, dtype=torch.float32,
                           device=device)
    segm_max = torch.empty(threshold, hq, TRITON_ATTN_SEGMENTS, dtype=torch.float32, device=device)
    segm_sum = torch.empty_like(segm_max)

    def run():
        unified_attention(q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_q,
                          max_seqlen_q=1, seqused_k=seq, max_seqlen_k=ctx,
                          softmax_scale=1 / math.sqrt(d), causal=True, window_size=(-1, -1),
                          block_table=table, softcap=0, q_descale=None, k_descale=descale,
                          v_descale=descale, seq_threshold_3D=threshold,
                          num_par_softmax_segments=TRITON_ATTN_SEGMENTS,
                          softmax_segm_output=segm_out, softmax_segm_max=segm_max,
                          softmax_segm_expsum=segm_sum)
        return out
    run.inputs = (q, key_cache, value_cache, table)
    return run, 2 * batch * ctx * kv_heads * d * cache.element_size()


def _paged_exact(q, key_cache, value_cache, table, ctx):
    """Exact float32 attention of ``q`` ``[B, Hq, d]`` over each sequence's first ``ctx``
    tokens of a paged cache ``[blocks, 16, H, d]``: what ``unified_attention`` must give."""
    b, hq, d = q.shape
    k = key_cache[table.long()].flatten(1, 2)[:, :ctx].float()  # [B, ctx, H, d]
    v = value_cache[table.long()].flatten(1, 2)[:, :ctx].float()
    g = hq // k.shape[2]
    logits = torch.einsum("bhgd,bthd->bhgt", q.float().view(b, -1, g, d), k) / math.sqrt(d)
    return torch.einsum("bhgt,bthd->bhgd", logits.softmax(-1), v).reshape(b, hq, d)


def _intree_case(kernels, preset, batch, ctx, d, kv_heads, gqa, device):
    """vLLM's in-tree decode over a random cache ``[blocks, 16, H, slot]``; bytes per step."""
    launch, config, get_centroids = kernels[:3]
    cfg = config.from_cache_dtype(preset, d)
    nb = batch * math.ceil(ctx / BLOCK_SIZE)
    # bytes below 0x3C keep every fp16 field (norms, scales) finite; codes stay valid
    cache = torch.randint(0, 0x3C, (nb, BLOCK_SIZE, kv_heads, cfg.slot_size_aligned),
                          dtype=torch.uint8, device=device)
    table = torch.randperm(nb, device=device).to(torch.int32).reshape(batch, -1)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, kv_heads * gqa, d, dtype=torch.bfloat16, device=device)
    rot = torch.linalg.qr(torch.randn(d, d, device=device))[0].contiguous()
    centroids = get_centroids(d, cfg.centroid_bits).to(device)

    def run():
        return launch(q, cache, table, seq, rot, centroids, 1 / math.sqrt(d),
                      mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
                      value_quant_bits=cfg.value_quant_bits, key_fp8=cfg.key_fp8,
                      norm_correction=cfg.norm_correction, PiT=rot,
                      max_num_kv_splits=INTREE_SPLITS)
    return run, batch * ctx * kv_heads * cfg.slot_size_aligned


def _smoke(kernels) -> None:
    """One tiny in-tree decode and one ``unified_attention`` decode on CPU tensors
    (interpreter): finite outputs of the right shape."""
    run, _ = _intree_case(kernels, "turboquant_4bit_nc", 2, 40, 64, 2, 3, "cpu")
    out = run()
    assert out.shape == (2, 6, 64) and bool(torch.isfinite(out.float()).all()), out
    print("smoke: vLLM in-tree decode ran under the interpreter", tuple(out.shape))
    # float32: the interpreter mis-computes bf16 here (errors ~1e9; float32 matches to 3e-7)
    run, _ = _vllm_triton_case(kernels, 2, 40, 64, 2, 3, "cpu", torch.float32)
    out = run()
    err = (out - _paged_exact(*run.inputs, 40)).abs().max().item()
    assert out.shape == (2, 6, 64) and err < 1e-5, (tuple(out.shape), err)
    print("smoke: vLLM unified_attention decode ran under the interpreter", tuple(out.shape),
          f"max error vs exact float32 attention {err:.1e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-src", help="a vLLM 0.32 `vllm` package folder (kernel files only)")
    ap.add_argument("--ours", default="tq4,tq3.5,tq3")
    ap.add_argument("--intree", default="turboquant_4bit_nc,turboquant_k3v4_nc,turboquant_3bit_nc")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gqa", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="eval/results/bench_intree_gpu.json")
    args = ap.parse_args(argv)
    kernels = _load_vllm_kernels(args.vllm_src)
    if args.smoke:
        _smoke(kernels)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_intree_gpu needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    import bench_decode_gpu as bench

    d, g, h = args.head_dim, args.gqa, args.kv_heads
    run, _ = _vllm_triton_case(kernels, 2, 40, d, h, g, "cuda")
    err = (run().float() - _paged_exact(*run.inputs, 40)).abs().max().item()
    if not err < 2e-2:  # bf16 output: a few ulps of values of order 1
        raise SystemExit(f"vLLM unified_attention as called here is off by {err:.2e}: fix the call")
    print(f"vLLM unified_attention check: max error vs exact attention {err:.1e}")
    rows = []

    def record(impl: str, preset: str, b: int, c: int, t: float, nbytes: int, t_ref: float):
        rows.append(dict(impl=impl, preset=preset, batch=b, ctx=c, head_dim=d, gqa=g,
                         ms=t, gbps=nbytes / t / 1e6, vs_bf16=t / t_ref))
        print(f"{impl:<13}{preset:<20} B{b:>3} ctx{c:>6}  {t:8.4f} ms  "
              f"{nbytes / t / 1e6:7.0f} GB/s  {t / t_ref:6.2f}x bf16", flush=True)

    for b in map(int, args.batches.split(",")):
        for c in map(int, args.contexts.split(",")):
            run, nbytes = bench._bf16_case(b, c, d, h, g)
            t_ref = bench._time_ms(bench._graphed(run))
            del run
            record("flash bf16", "auto", b, c, t_ref, nbytes, t_ref)
            cases = [("vLLM triton", "auto",
                      lambda: _vllm_triton_case(kernels, b, c, d, h, g, "cuda"))]
            cases += [("tq-vllm", p, lambda p=p: bench._tq_case(p, b, c, d, h, g))
                     for p in args.ours.split(",")]
            cases += [("vLLM in-tree", p, lambda p=p: _intree_case(kernels, p, b, c, d, h, g, "cuda"))
                      for p in args.intree.split(",")]
            for impl, preset, make in cases:
                run, nbytes = make()
                record(impl, preset, b, c, bench._time_ms(bench._graphed(run)), nbytes, t_ref)
                del run
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), kv_heads=h,
                                   block_size=BLOCK_SIZE, cuda_graph=True, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
