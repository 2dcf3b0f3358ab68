"""Strict-mode perplexity of codec variants in transformers (fast A/B for the quality work).

Every listed layer's K and V go through the codec (encode → decode, QJL estimator
included) before attention, as vLLM's strict mode computes from the packed cache.
Documents: Paul Graham essays (``eval/textdata.py``), first ``--tokens`` tokens of each.
Per variant: perplexity and its paired Δ against exact attention, and how far the
next-token predictions move from exact's: mean KL(exact ‖ variant) per token and the
share of positions whose top-1 token agrees (no sign to cancel, unlike Δ perplexity).
Calibration (for the ``+kmean``/``+ksmooth``/``+vmean``/``+perm`` options): Python's own
``pydoc_data`` reference text, disjoint from the evaluation essays.

Variant syntax: ``PRESET[+nc][+kmean][+ksmooth][+vmean][+perm][+nofb][@ends=N]``::

    nc       norm correction (stored norm = ‖x‖ / ‖centroids‖) for K and V
    kmean    key mean removal      ksmooth  key channel smoothing s = rms_k^½
                                   (in ``tq{b}`` until 2026-11-24; ``tq4+ksmooth`` A/B's it)
    kbal     key smoothing balanced against the queries, s² ∝ rms_k / rms_q (on in ``tq{b}``)
    vmean    value mean removal    vsmooth  value smoothing s² ∝ rms_v / ‖o_proj col‖
    perm     outlier half chosen by calibration RMS
    gauss    Gaussian N(0, 1/d) codebook instead of the exact sphere-coordinate law
    qshrink  QJL keys: the QJL term scaled by its logit-MSE-optimal factor
             (``rotation.qjl_shrink_factor``: 0.39 for the paper's Gaussian sketch at d 64)
    qorth    QJL keys: orthonormal sketch rows instead of Gaussian ones
    kchoice  per-token key offset choice: each key is stored as k − μ or as k, whichever
             decodes closer (a flag bit; flagged keys' logits have ⟨q, μ⟩ taken off), so
             the sink, far from the mean, keeps its own small residual (on in ``tq{b}``)
    nokchoice  the offset choice off (A/B against the recommended presets)
    offres   the offset choice by the smaller residual (two encodings per key: every preset)
    offnorm  the offset choice by the smaller norm before encoding (one encoding per key:
             for trellis keys one Viterbi search instead of two; thirteenth round)
    nofb     keys rounded to the nearest code (trellis: searched for the least ‖y − ŷ‖)
             instead of against the calibration queries (``tq{b}``'s keys round with
             feedback since 2026-11-25, ``tq{b}-trellis``'s since the twelfth round:
             ``TensorCodec.feedback``)
    kexact / vexact   leave keys / values unquantized (error attribution)
    ends=N   first and last N layers stay exact (counted at 16 bits)
    sink=N   the first N tokens of each document stay exact (attention sinks)
    trellis=S  K and V as bitshift-trellis codes with S state bits (``tq_vllm.trellis``:
             same bits, 1.2–2.1 dB less distortion at S = 6; ``tq{b}-trellis`` is
             ``tq{b}@trellis=6``); searched by the CPU kernel where it builds
    vtrellis=S  the values alone as trellis codes (keys as the preset has them): the
             values carry most of the loss below 4 bits, and their plain search is a
             fraction of the keys' search against the queries
    jitter=S realization S: float noise of 5e-7 (relative) on every quantized layer's
             attention output, about what the serving kernels differ from SDPA by; the
             quantizer turns it into other code choices downstream, so Δ perplexity moves
             by a few tenths of a point per document. ``--realizations N`` runs S = 1..N
             beside each variant and prints their mean: one deterministic realization is
             a single draw, and a recipe tuned on it fits its noise (docs/quality.md).

PRESET is a preset name (the recommended ``tq{b}`` bring their own calibrated transforms,
as in vLLM), ``auto``, ``fp8`` (vLLM's fp8 KV cache emulated: K and V cast to
float8 e4m3 with vLLM's default scale 1.0, saturating at ±448), vLLM 0.32's own
per-token-head caches ``int4_per_token_head``, ``int8_per_token_head``,
``fp8_per_token_head`` (emulated: :class:`PerTokenHeadCast`), or ``kKvV`` (e.g. ``k4v3``):
MSE keys at K and values at V bits per coordinate (fractional → split halves); ``k3qv4``
adds a QJL sketch of the key residual (the paper's TurboQuant_prod keys), ``k3q2v4`` with 2
sketch rows per coordinate, ``k3.5qov4`` sketching only the outlier half's residual (QJL
A/B, docs/quality.md).

    python eval/ppl_strict.py --model smollm2 --docs 8 auto tq4-mse tq4-mse+nc+kmean
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from textdata import paul_graham_essays  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tq_vllm import trellis  # noqa: E402
from tq_vllm.calibration import LayerTransform, calibrated_codec  # noqa: E402
from tq_vllm.config import (Preset, TensorCodec, get_preset, mse_codec,  # noqa: E402
                            with_trellis)
from tq_vllm.rotation import hadamard  # noqa: E402
from tq_vllm.tools import hf_attention  # noqa: E402
from tq_vllm.tools.calibrate import calibration_token_chunks  # noqa: E402
from tq_vllm.tools.models import fetch_model  # noqa: E402

FP8_MAX = 448.0
"""Largest finite float8 e4m3 value: vLLM's fp8 cache stores with saturation."""


class Fp8Cast:
    """vLLM's ``fp8`` KV cache (e4m3, scale 1.0) as an encode → decode pair."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()


class Fp8Codec:
    """Stand-in for a ``LayerCodec`` (``.key``/``.value`` encode and decode) for ``fp8``."""

    key = value = Fp8Cast()


PER_TOKEN_HEAD = {"int4_per_token_head": 4, "int8_per_token_head": 8, "fp8_per_token_head": 8}
"""vLLM 0.32's per-token-head KV cache dtypes and their code bits (each token and KV head
also stores a float32 scale: 32 / head_dim more bits per coordinate)."""

VLLM_RHT_SEED = 0x9E3779B9
"""Seed of the ±1 signs of vLLM's randomized Hadamard transform for ``int4_per_token_head``
(``vllm/v1/attention/ops/int4_per_token_head.py``, ``_get_rht_signs``)."""


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """vLLM's rounding before an integer store: ``x ± 0.5`` truncated toward zero."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


class PerTokenHeadCast:
    """vLLM 0.32's ``{int4,int8,fp8}_per_token_head`` KV caches as an encode → decode pair,
    one float32 scale per token and KV head (``triton_reshape_and_cache_flash.py``,
    ``int4_per_token_head.py``). int8 / fp8: symmetric, scale ``max|x| / 127`` (``/ 448``),
    codes ``x · (1 / scale)`` rounded half away from zero and clamped to [−128, 127] (int8)
    or clamped to ±448 and cast to e4m3 (fp8). int4: the head vector rotated first by vLLM's
    randomized Hadamard transform (``H · (signs ⊙ x)``, H unnormalised), then asymmetric codes
    0..15 from its min and max with a zero point, which vLLM keeps in the scale's 4 low
    mantissa bits (cleared again to decode); decoded vectors are rotated back."""

    def __init__(self, kind: str):
        if kind not in PER_TOKEN_HEAD:
            raise ValueError(f"unknown per-token-head cache {kind!r}; choose from "
                             f"{sorted(PER_TOKEN_HEAD)}")
        self.kind = kind.split("_")[0]  # int4 / int8 / fp8

    @staticmethod
    @lru_cache(maxsize=None)
    def _rht(d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(±1 signs ``[d]``, unnormalised Hadamard ``[d, d]``) of vLLM's transform, float32."""
        gen = torch.Generator().manual_seed(VLLM_RHT_SEED)
        signs = 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0
        return signs, hadamard(d).float()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes ``[N, H, d]``, float32 scales ``[N, H, 1]``) of ``x`` ``[N, H, d]``."""
        x = x.float()
        if self.kind == "int4":
            signs, h = self._rht(x.shape[-1])
            y = (x * signs) @ h
            lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15.0).clamp_min(1e-6)
            zp = _round_half_away(-lo / scale).clamp(0.0, 15.0)
            q = _round_half_away(y * (1.0 / scale) + zp).clamp(0.0, 15.0)
            packed = (scale.view(torch.int32) & -16) | zp.to(torch.int32)
            return q - zp, packed.view(torch.float32)
        qmax = 127.0 if self.kind == "int8" else FP8_MAX
        scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-6)
        q = x * (1.0 / scale)
        if self.kind == "int8":
            return _round_half_away(q).clamp(-128.0, 127.0), scale
        return q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale

    def decode(self, enc: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, scale = enc
        if self.kind != "int4":
            return q.float() * scale
        y = q * (scale.view(torch.int32) & -16).view(torch.float32)
        signs, h = self._rht(y.shape[-1])
        return (y @ h) * signs / y.shape[-1]


class PerTokenHeadCodec:
    """Stand-in for a ``LayerCodec`` for vLLM's per-token-head caches."""

    def __init__(self, kind: str):
        self.key = self.value = PerTokenHeadCast(kind)


def use_native_trellis_search() -> bool:
    """Search trellis codes with the CPU kernel (bit-identical to :func:`trellis.encode`,
    tests/kernels/test_cpu_ops.py, and ~100× faster) where the native library builds."""
    from tq_vllm.kernels import cpu_native, cpu_ops

    if cpu_native.load_trellis() is None or cpu_native.load_trellis_fed() is None:
        return False
    trellis.encode = cpu_ops.trellis_search
    trellis.encode_fed = cpu_ops.trellis_search_fed
    return True


OPTIONS = ("nc", "kmean", "ksmooth", "kbal", "vmean", "vsmooth", "perm", "gauss", "kchoice",
           "nokchoice", "kexact", "vexact", "qshrink", "qorth", "nofb", "offres", "offnorm")


def parse_variant(spec: str) -> dict:
    body, *at = spec.split("@")
    name, *opts = body.split("+")
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        raise SystemExit(f"unknown option(s) {bad} in {spec!r}; choose from {OPTIONS}")
    kw = {k: int(v) for k, v in (a.split("=") for a in at)}
    if set(kw) - set(AT_SETTINGS):
        raise SystemExit(f"unknown @ setting(s) {sorted(set(kw) - set(AT_SETTINGS))} "
                         f"in {spec!r}; choose from {', '.join(AT_SETTINGS)}")
    return {"spec": spec, "preset": name, "opts": set(opts),
            **{k: kw.get(k, 0) for k in AT_SETTINGS}}


AT_SETTINGS = ("ends", "sink", "jitter", "trellis", "vtrellis")


VARIANT_CODECS = re.compile(r"k([\d.]+)(?:q(\d*)(o?))?v([\d.]+)")
"""``kKvV``: MSE keys at K and values at V bits; ``kKqvV``: keys K-bit MSE plus a QJL
sketch of the residual, ``kKqRvV`` with R sketch rows per coordinate, ``kKqovV`` (K
fractional) sketching only the outlier half's residual."""


def get_variant_preset(name: str) -> Preset:
    m = VARIANT_CODECS.fullmatch(name)
    if not m:
        return get_preset(name)
    kbits, rows, outlier, vbits = m.groups()  # rows is None without "q"
    qjl_kw = {} if rows is None else {"qjl": True, "qjl_rows": int(rows or 1),
                                      "qjl_group": "outlier" if outlier else "all"}
    key = mse_codec(kbits, **qjl_kw)
    return Preset(name=f"tq-{name}", family="mse", budget="4", key=key, value=mse_codec(vbits))


OPTION_TRANSFORM = {"kmean": {"key_mean": True}, "ksmooth": {"key_scale": "rms"},
                    "kbal": {"key_scale": "balanced"}, "vmean": {"value_mean": True},
                    "vsmooth": {"value_scale": True}, "perm": {"calibrated_split": True},
                    "kchoice": {"key_offset_choice": True}, "nokchoice": {"key_offset_choice": False},
                    "offres": {"key_offset_rule": "residual"}, "offnorm": {"key_offset_rule": "norm"}}


def variant_preset(variant: dict) -> Preset:
    """The preset a variant runs: its base preset plus the options' codec and transforms."""
    preset = get_variant_preset(variant["preset"])
    o = variant["opts"]
    if "nc" in o:
        preset = preset.model_copy(update={
            "key": preset.key.model_copy(update={"norm_correction": True}),
            "value": preset.value.model_copy(update={"norm_correction": True})})
    if "gauss" in o:
        preset = preset.model_copy(update={"codebook": "gaussian"})
    if "qshrink" in o:
        if not preset.key.qjl:
            raise SystemExit(f"{variant['spec']}: qshrink needs QJL keys (tq{{b}}-qjl or kKqvV)")
        preset = preset.model_copy(update={"key": preset.key.model_copy(update={"qjl_shrink": True})})
    if "qorth" in o:
        preset = preset.model_copy(update={"sketch": "orthogonal"})
    if "nofb" in o:
        preset = preset.model_copy(update={"key": preset.key.model_copy(update={"feedback": False})})
    if variant["trellis"]:
        preset = with_trellis(preset, variant["trellis"])
    if variant["vtrellis"]:
        value = TensorCodec.model_validate({**preset.value.model_dump(),
                                            "trellis": variant["vtrellis"]})
        preset = preset.model_copy(update={"value": value})
    update = {k: v for opt in o for k, v in OPTION_TRANSFORM.get(opt, {}).items()}
    return preset.model_copy(update={"transform": preset.transform.model_copy(update=update)})


def build_layers(variant: dict, num_layers: int, head_dim: int, calib) -> dict:
    """``{layer: (codec, transform)}`` exactly as the vLLM backend builds them."""
    if variant["preset"] == "auto":
        return {}
    if variant["preset"] == "fp8":
        return {i: (Fp8Codec(), LayerTransform()) for i in range(num_layers)}
    if variant["preset"] in PER_TOKEN_HEAD:
        codec = PerTokenHeadCodec(variant["preset"])
        return {i: (codec, LayerTransform()) for i in range(num_layers)}
    preset = variant_preset(variant)
    n = variant["ends"]
    layers = {}
    for i in range(n, num_layers - n):
        layers[i] = calibrated_codec(preset, calib[i], head_dim, layer=i)
    return layers


def run_variant(model, variant: dict, head_dim: int, calib):
    """Context in which ``model`` attends as ``variant`` says (codec, exact parts, sinks)."""
    cfg = model.config
    layers = build_layers(variant, cfg.num_hidden_layers, head_dim, calib)
    parts = "".join(p for p in "kv" if f"{p}exact" not in variant["opts"])
    return hf_attention.quantized(model, layers, parts, variant["sink"], variant["jitter"])


def bits_per_coord(variant: dict, num_layers: int, head_dim: int) -> float:
    if variant["preset"] in ("auto", "fp8"):
        return 16.0 if variant["preset"] == "auto" else 8.0
    if variant["preset"] in PER_TOKEN_HEAD:
        return PER_TOKEN_HEAD[variant["preset"]] + 32 / head_dim
    kb, vb = get_variant_preset(variant["preset"]).bits_per_coord(head_dim)
    n = variant["ends"]
    quant = num_layers - 2 * n
    return ((kb + vb) / 2 * quant + 16.0 * 2 * n) / num_layers


def load_model(name: str):
    """(tokenizer, float32 eval model, head_dim) of a bundled model."""
    path = fetch_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return AutoTokenizer.from_pretrained(path), model, head_dim


def essay_docs(tok, essays: dict[str, str], docs: int, tokens: int) -> tuple[list[torch.Tensor], int]:
    """The first ``tokens`` token ids ``[tokens]`` of each of the first ``docs`` essays that
    are that long, and the index of the last essay read."""
    out, last = [], 0
    for last, text in enumerate(essays.values()):
        ids = tok(text, return_tensors="pt").input_ids[0]
        if ids.numel() >= tokens:
            out.append(ids[:tokens])
        if len(out) == docs:
            break
    return out, last


@torch.no_grad()
def doc_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[n − 1, vocab]`` float32 of a document ``[n]``."""
    return model(ids[None]).logits[0, :-1].float().log_softmax(-1)


def nll(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logprobs`` ``[n − 1, vocab]``."""
    return float(-logprobs.gather(-1, ids[1:, None]).sum())


def divergence(logprobs: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(summed KL(ref ‖ logprobs) in nats, positions whose top-1 token agrees) over the
    positions of two ``[n, vocab]`` next-token log-probabilities: how far a variant's
    predictions move from exact attention's, with no sign to cancel (Δ perplexity can be 0
    while every prediction moved)."""
    kl = (ref.exp() * (ref - logprobs)).sum()
    return float(kl), int((logprobs.argmax(-1) == ref.argmax(-1)).sum())


def print_realizations(results: list[dict]) -> None:
    """Per variant: its plain Δ perplexity, and the mean ± sd over its jittered realizations."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        body, *at = r["variant"].split("@")
        at = [a for a in at if not a.startswith("jitter=")]
        groups.setdefault("@".join([body, *at]), []).append(r)
    print("realizations (Δ perplexity %, KL): plain | mean ± sd over the jittered ones")
    for spec, rows in groups.items():
        plain = [r for r in rows if "jitter=" not in r["variant"]]
        jit = [r for r in rows if "jitter=" in r["variant"]]
        if not jit or not plain or "delta_pct" not in plain[0]:
            continue
        d = torch.tensor([r["delta_pct"] for r in jit])
        kl = torch.tensor([r["kl"] for r in jit])
        sd = float(d.std()) if len(jit) > 1 else float("nan")
        print(f"{spec:<40} {plain[0]['delta_pct']:+6.2f}% / {plain[0]['kl']:.4f} | "
              f"{float(d.mean()):+6.2f}% ± {sd:.2f} / {float(kl.mean()):.4f}  ({len(jit)} realizations)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--calib-text", choices=("pydoc", "essays"), default="pydoc",
                    help="calibration source: the runtime's pydoc text, or held-out essays "
                         "(the last ones, never evaluated) to measure the domain effect")
    ap.add_argument("--realizations", type=int, default=0,
                    help="also run each quantized variant at @jitter=1..N and print the mean")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    specs = list(args.variants)
    for spec in args.variants:
        if spec != "auto" and "jitter=" not in spec:
            specs += [f"{spec}@jitter={j}" for j in range(1, args.realizations + 1)]
    variants = [parse_variant(s) for s in specs]
    for v in variants:  # refuse a bad spec before loading anything
        vllm_cache = v["preset"] == "fp8" or v["preset"] in PER_TOKEN_HEAD
        if vllm_cache and (v["opts"] or v["trellis"] or v["vtrellis"] or v["ends"]):
            raise SystemExit(f"{v['spec']}: {v['preset']} takes no options "
                             "(only @sink and @jitter)")
        if v["preset"] != "auto" and not vllm_cache:
            variant_preset(v)
    tok, model, head_dim = load_model(args.model)
    cfg = model.config
    nl = cfg.num_hidden_layers
    essays = paul_graham_essays()
    docs, last = essay_docs(tok, essays, args.docs, args.tokens)
    if args.calib_text == "pydoc":
        chunks = calibration_token_chunks(tok, args.calib_chunks, args.tokens)
    else:
        held_out = [tok(t, return_tensors="pt").input_ids[0] for t in list(essays.values())[-12:]]
        chunks = [ids[: args.tokens] for ids in held_out if ids.numel() >= args.tokens]
        chunks = chunks[: args.calib_chunks]
        if last >= len(essays) - 12:
            raise SystemExit("held-out calibration essays overlap the evaluated ones")
    with hf_attention.capture(model) as calib:
        for chunk in chunks:
            model(chunk[None])
    if any(v["trellis"] or v["vtrellis"] or "trellis" in v["preset"] for v in variants):
        how = "CPU kernel" if use_native_trellis_search() else "PyTorch reference (slow)"
        print(f"trellis codes searched by the {how}", flush=True)
    if not any(v["preset"] == "auto" for v in variants):
        variants.insert(0, parse_variant("auto"))
    variants.sort(key=lambda v: v["preset"] != "auto")  # exact first: the reference
    results = []
    base = None
    ref_lps: list[torch.Tensor] = []  # exact attention's, for the divergence columns
    for var in variants:
        t0 = time.time()
        per_doc, kl, agree, count = [], 0.0, 0, 0
        with run_variant(model, var, head_dim, calib):
            for i, ids in enumerate(docs):
                lp = doc_logprobs(model, ids)
                per_doc.append(nll(lp, ids) / (ids.numel() - 1))
                if var["preset"] == "auto" and len(ref_lps) < len(docs):
                    ref_lps.append(lp)
                k, a = divergence(lp, ref_lps[i])
                kl, agree, count = kl + k, agree + a, count + lp.shape[0]
        ppl = math.exp(sum(per_doc) / len(per_doc))
        row = {"variant": var["spec"], "ppl": ppl, "per_doc_nll": per_doc,
               "bits_per_coord": bits_per_coord(var, nl, head_dim),
               "kl": kl / count, "top1_agree": agree / count}
        if var["preset"] == "auto":
            base = row
        if base is not None:
            diffs = torch.tensor(per_doc) - torch.tensor(base["per_doc_nll"])
            mean = float(diffs.mean())
            se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
            row["delta_pct"] = 100 * (math.exp(mean) - 1)
            row["delta_se_pct"] = 100 * se
        results.append(row)
        print(f"{var['spec']:<40} bits {row['bits_per_coord']:5.2f}  ppl {ppl:8.3f}  "
              f"Δ {row.get('delta_pct', 0):+7.2f}% ± {row.get('delta_se_pct', 0):.2f}  "
              f"KL {row['kl']:.4f}  top-1 {100 * row['top1_agree']:5.1f}%  "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.realizations:
        print_realizations(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "docs": len(docs),
                                         "tokens": args.tokens, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
