"""Transformers attention hook: capture post-RoPE K/V, or run attention on quantized K/V.

Used by the calibration (capture) and by the quality scripts (strict-mode emulation:
every layer's K and V go through the codec's encode → decode before attention, which
is what vLLM's strict mode computes from the packed cache). ``decode`` returns, for
TurboQuant_prod keys, vectors whose inner products equal the QJL estimator, so the
emulation includes the QJL logit bias exactly.

Usage::

    with capture(model) as stats:       # stats[layer]: KVStats (moments of K, V, Q)
        model(input_ids)
    with quantized(model, {layer: (codec, transform)}):
        logits = model(input_ids).logits
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tq_vllm.calibration import KVStats, LayerTransform
from tq_vllm.codec import LayerCodec

HOOK_NAME = "tq_vllm_hook"
_state: dict = {"mode": None}

JITTER_REL = 5e-7
"""Relative size of the float noise a jittered realization puts on every quantized layer's
attention output: about what the serving kernels differ from SDPA by (3–8e-7 relative,
both against float64). Quantization turns such noise into different code choices in later
layers, so each jitter seed draws another realization of the quantization noise."""


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, d]`` → ``[B·T, H, d]``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d)


def _from_tokens(x: torch.Tensor, b: int) -> torch.Tensor:
    n, h, d = x.shape
    return x.reshape(b, n // b, h, d).transpose(1, 2)


def _hook(module, query, key, value, attention_mask, **kwargs):
    layer = module.layer_idx
    mode = _state["mode"]
    if mode == "capture":
        o_proj = getattr(getattr(module, "o_proj", None), "weight", None)
        _state["kv"].setdefault(layer, []).append(KVStats.from_samples(
            _to_tokens(key).detach().cpu(), _to_tokens(value).detach().cpu(),
            _to_tokens(query).detach().cpu(), None if o_proj is None else o_proj.detach().cpu()))
    elif mode == "quantize" and layer in _state["layers"]:
        codec, tf = _state["layers"][layer]
        b = key.shape[0]
        k, v, q = _to_tokens(key.float()), _to_tokens(value.float()), _to_tokens(query.float())
        k, v, q = tf.keys(k), tf.values(v), tf.queries(q)
        exact = torch.arange(k.shape[0]) % key.shape[2] < _state["sink"]
        if codec is not None and "k" in _state["parts"]:
            k = torch.where(exact[:, None, None], k, codec.key.decode(codec.key.encode(k)))
        if codec is not None and "v" in _state["parts"]:
            v = torch.where(exact[:, None, None], v, codec.value.decode(codec.value.encode(v)))
        out, w = sdpa_attention_forward(module, _from_tokens(q, b).to(query.dtype),
                                        _from_tokens(k, b).to(key.dtype),
                                        _from_tokens(v, b).to(value.dtype), attention_mask, **kwargs)
        if _state["jitter"]:
            gen = torch.Generator().manual_seed(_state["jitter"] * 100_003 + layer)
            noise = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            out = out * (1 + JITTER_REL * noise)
        tf.restore_output(out.view(-1, *out.shape[2:]))  # out: [B, T, Hq, d], in place
        return out, w
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(HOOK_NAME, _hook)


@contextlib.contextmanager
def _active(model, **state) -> Iterator[None]:
    prev = model.config._attn_implementation
    model.set_attn_implementation(HOOK_NAME)
    _state.update(state)
    try:
        yield
    finally:
        _state.clear()
        _state["mode"] = None
        model.set_attn_implementation(prev)


@contextlib.contextmanager
def capture(model) -> Iterator[dict[int, KVStats]]:
    """Per-layer calibration moments of post-RoPE K/V and queries over the forwards run
    inside (every forward weighs equally: run equal-length chunks)."""
    result: dict[int, KVStats] = {}
    with _active(model, mode="capture", kv={}):
        yield result
        for layer, parts in _state["kv"].items():
            result[layer] = KVStats(*(torch.stack([getattr(p, f) for p in parts]).mean(0)
                                      for f in KVStats.FIELDS))


@contextlib.contextmanager
def quantized(model, layers: dict[int, tuple[LayerCodec | None, LayerTransform]],
              parts: str = "kv", sink: int = 0, jitter: int = 0) -> Iterator[None]:
    """Attention on transformed, encode→decoded K/V for the listed layers (others exact);
    ``parts`` names which of K and V go through the codec (error attribution), the
    first ``sink`` positions of every sequence stay exact, and a nonzero ``jitter`` seed
    adds :data:`JITTER_REL` float noise to their attention outputs (another realization)."""
    with _active(model, mode="quantize", layers=layers, parts=parts, sink=sink, jitter=jitter):
        yield
