"""The transformers attention hook of the quality scripts: capture, quantize, jitter."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tq_vllm.calibration import LayerTransform
from tq_vllm.codec import LayerCodec
from tq_vllm.config import get_preset
from tq_vllm.tools import hf_attention


def _tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_jitter_draws_another_realization_and_only_on_quantized_layers():
    """A jitter seed perturbs a quantized run by float noise (small, deterministic per
    seed, different between seeds); plain quantized runs repeat exactly, and the exact
    model (no quantized layers) is untouched by it."""
    model = _tiny_model()
    ids = torch.randint(0, 97, (1, 48))
    layers = {i: (LayerCodec.create(get_preset("tq4"), 64, 2, layer=i), LayerTransform())
              for i in range(2)}

    def logits(lay, jitter=0):
        with torch.no_grad(), hf_attention.quantized(model, lay, jitter=jitter):
            return model(ids).logits

    plain, again = logits(layers), logits(layers)
    j1, j1_again, j2 = logits(layers, 1), logits(layers, 1), logits(layers, 2)
    assert torch.equal(plain, again) and torch.equal(j1, j1_again)
    assert not torch.equal(j1, plain) and not torch.equal(j1, j2)
    rel = float((j1 - plain).norm() / plain.norm())
    assert rel < 1e-3, rel  # float noise, not a different model
    with torch.no_grad():
        exact = model(ids).logits
    assert torch.equal(logits({}, 3), exact)
