"""Attention fidelity per layer on real K/V (shadow mode): each preset against exact.

The model reads one essay (``--tokens`` tokens); every layer's post-RoPE queries, keys and
values are captured, stored through :class:`tq_vllm.api.KVCompressor` (the calibrated
presets use the model's cached calibration, as vLLM does) with the exact shadow copy
beside the codes, and causal attention of every query is compared with exact attention:

``logit RMSE``   RMS of (estimated − exact) scaled logits ``⟨q, k⟩/√d`` over all causal pairs
``logit bias``   their mean (QJL: unbiased; MSE codes: a small shrinkage)
``KL``           mean KL(exact ‖ estimated) of the attention distributions (nats)
``top-8``        mean overlap of the 8 most attended positions (queries past position 64)
``out cos``      mean cosine of the attention outputs (values through the codec too)

    python eval/attention_fidelity.py --model smollm2 --presets tq4,tq4-mse,tq4-qjl,tq3.5,...

Prints a per-preset summary (means over layers, worst layer), writes JSON with every
layer and a markdown table to ``eval/results/fidelity_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from textdata import paul_graham_essays  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from tq_vllm.api import KVCompressor  # noqa: E402
from tq_vllm.config import PRESET_NAMES, get_preset  # noqa: E402
from tq_vllm.tools.calibrate import model_calibration  # noqa: E402
from tq_vllm.tools.models import fetch_model  # noqa: E402

TOP_K = 8
TOP_K_FROM = 64  # top-k overlap only where a query sees well over k keys
_captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    """``[1, H, T, d]`` → ``[T, H, d]`` copies per layer, then ordinary SDPA."""
    _captured[module.layer_idx] = tuple(x[0].transpose(0, 1).float().clone()
                                        for x in (query, key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("tq_vllm_fidelity", _capture)


def causal_attention(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[T, Hq, T]`` and outputs ``[T, Hq, d]`` of causal attention from
    scaled scores ``[T, Hq, T]`` and values ``[T, Hq, d]``."""
    t = scores.shape[0]
    mask = torch.ones(t, t, dtype=torch.bool).tril()[:, None, :]
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return p, torch.einsum("lhn,nhd->lhd", p, v)


def layer_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: str,
                  layer: int, calibration) -> dict[str, float]:
    """Fidelity of one layer: q ``[T, Hq, d]``, k/v ``[T, H, d]`` float32."""
    t, hq, d = q.shape
    h = k.shape[1]
    comp = KVCompressor(preset, d, h, layer=layer, keep_exact_shadow=True,
                        calibration=calibration[layer] if calibration else None)
    comp.append(k, v)
    scale = 1 / math.sqrt(d)
    est, ref = comp.scores(q) * scale, comp.exact_scores(q) * scale  # [T, Hq, T]
    causal = torch.ones(t, t, dtype=torch.bool).tril()[:, None, :].expand(t, hq, t)
    err = (est - ref)[causal]
    k_hat, v_hat = comp.decode(comp.slots)
    head_of = torch.arange(hq) // (hq // h)
    p_ref, o_ref = causal_attention(ref, v[:, head_of])
    p_est, o_est = causal_attention(est, v_hat[:, head_of])
    log_ref, log_est = p_ref.clamp_min(1e-30).log(), p_est.clamp_min(1e-30).log()
    kl = (p_ref * (log_ref - log_est)).sum(-1)
    top_ref = p_ref[TOP_K_FROM:].topk(TOP_K, -1).indices
    top_est = p_est[TOP_K_FROM:].topk(TOP_K, -1).indices
    overlap = (top_ref[..., :, None] == top_est[..., None, :]).any(-1).float().mean()
    cos = torch.nn.functional.cosine_similarity(o_est, o_ref, dim=-1)
    return {"logit_rmse": err.pow(2).mean().sqrt().item(), "logit_bias": err.mean().item(),
            "kl": kl.mean().item(), "top8": overlap.item(), "out_cos": cos.mean().item()}


def summary(rows: dict[str, list[dict]], model: str) -> str:
    cols = ("logit_rmse", "logit_bias", "kl", "top8", "out_cos")
    lines = [f"**{model}**: means over layers (worst layer's KL in brackets)", "",
             "| preset | bits/coord | logit RMSE | logit bias | KL (nats) | top-8 overlap | out cos |",
             "|---|---|---|---|---|---|---|"]
    for name, layers in rows.items():
        mean = {c: sum(r[c] for r in layers) / len(layers) for c in cols}
        worst = max(range(len(layers)), key=lambda i: layers[i]["kl"])
        lines.append(
            f"| {name} | {layers[0]['bits_per_coord']:.2f} | {mean['logit_rmse']:.4f} | "
            f"{mean['logit_bias']:+.5f} | {mean['kl']:.5f} (L{worst}: {layers[worst]['kl']:.4f}) | "
            f"{mean['top8']:.3f} | {mean['out_cos']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--presets", default=",".join(PRESET_NAMES))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--essay", type=int, default=0, help="index of the essay to read")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    path = fetch_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = list(paul_graham_essays().values())[args.essay]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    model.set_attn_implementation("tq_vllm_fidelity")
    model(ids)
    calibration = model_calibration(path)
    rows: dict[str, list[dict]] = {}
    for name in args.presets.split(","):
        preset = get_preset(name)
        layers = []
        for layer in sorted(_captured):
            q, k, v = _captured[layer]
            m = layer_metrics(q, k, v, name, layer,
                              calibration if preset.transform.needs_calibration else None)
            kb, vb = preset.bits_per_coord(k.shape[-1])
            layers.append({"layer": layer, "bits_per_coord": (kb + vb) / 2, **m})
        rows[name] = layers
        print(summary({name: layers}, args.model).splitlines()[-1], flush=True)
    md = summary(rows, args.model)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fidelity_{args.model}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"fidelity_{args.model}.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
