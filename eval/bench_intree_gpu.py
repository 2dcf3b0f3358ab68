"""Decode speed on a GPU: our Triton kernel beside vLLM's in-tree TurboQuant kernel.

Per decode step (one layer, block size 16, each step captured in a CUDA graph and timed by
replays, as vLLM serves GPU decode), side by side in one run: FlashAttention on a dense
bf16 cache (PyTorch SDPA, the optimistic exact baseline of ``bench_decode_gpu.py``), our
``triton_ops.decode`` for ``--ours`` presets, and vLLM 0.32's
``triton_turboquant_decode_attention`` (stage 1 + 2, its launcher unchanged: 32 KV splits,
one program per query head) for ``--intree`` presets, on random valid caches. Prints
ms per step, ratio to FlashAttention and effective GB/s of cache read; writes JSON.

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
    """(decode launcher, TurboQuantConfig, get_centroids) from vLLM, or from the ``vllm``
    folder ``src`` with stand-ins for its platform and Triton wrappers."""
    if src is None:
        import vllm.triton_utils  # noqa: F401
        from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
        from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
        from vllm.v1.attention.ops.triton_turboquant_decode import (
            triton_turboquant_decode_attention)
        return triton_turboquant_decode_attention, TurboQuantConfig, get_centroids
    import triton
    import triton.language as tl

    root = Path(src)
    pkg = types.ModuleType("vllm")
    pkg.__path__ = [str(root)]
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(
        is_rocm=lambda: False, is_cuda_alike=torch.cuda.is_available, is_cuda=torch.cuda.is_available)
    tutils = types.ModuleType("vllm.triton_utils")
    tutils.triton, tutils.tl = triton, tl
    sys.modules.update({"vllm": pkg, "vllm.platforms": platforms, "vllm.triton_utils": tutils})

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
    return triton_turboquant_decode_attention, cfg.TurboQuantConfig, cent.get_centroids


def _intree_case(kernels, preset, batch, ctx, d, kv_heads, gqa, device):
    """vLLM's in-tree decode over a random cache ``[blocks, 16, H, slot]``; bytes per step."""
    launch, config, get_centroids = kernels
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
    """One tiny in-tree decode on CPU tensors (interpreter): finite outputs of the right shape."""
    run, _ = _intree_case(kernels, "turboquant_4bit_nc", 2, 40, 64, 2, 3, "cpu")
    out = run()
    assert out.shape == (2, 6, 64) and bool(torch.isfinite(out.float()).all()), out
    print("smoke: vLLM in-tree decode ran under the interpreter", tuple(out.shape))


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
            cases = [("tq-vllm", p, lambda p=p: bench._tq_case(p, b, c, d, h, g))
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
