"""Pack/unpack of slots is bit-exact and matches the config's byte map."""

import pytest
import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS, mse_codec
from tq_vllm.layout import pack_bits, pack_slots, unpack_bits, unpack_slots


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bitstream_roundtrip_and_order(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 64), codes)
    # LSB-first: code 0 sits in the low bits of byte 0
    assert int(packed[0, 0]) & ((1 << bits) - 1) == int(codes[0, 0])


def test_three_bit_stream_crosses_bytes_as_documented():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack_bits(codes, 3)[0].tolist() == list(stream.to_bytes(3, "little"))


SKETCH_VARIANTS = {  # issue 7's QJL A/B codecs (PyTorch reference only)
    "rows2": PRESETS["tq4-qjl"].model_copy(update={"key": mse_codec("3", qjl=True, qjl_rows=2)}),
    "outlier-half": PRESETS["tq4-qjl"].model_copy(
        update={"key": mse_codec("3.5", qjl=True, qjl_group="outlier")}),
}


@pytest.mark.parametrize("name", sorted(PRESETS) + sorted(SKETCH_VARIANTS))
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_slot_roundtrip_bit_exact(name, dim):
    preset = PRESETS.get(name) or SKETCH_VARIANTS[name]
    codec = LayerCodec.create(preset, dim, num_kv_heads=2)
    lay = preset.layout(dim)
    k, v = torch.randn(7, 2, dim), torch.randn(7, 2, dim)
    ke, ve = codec.key.encode(k), codec.value.encode(v)
    slots = pack_slots(lay, ke, ve)
    assert slots.shape == (7, 2, lay.slot_bytes) and slots.dtype == torch.uint8
    k2, v2 = unpack_slots(lay, slots)
    assert torch.equal(k2.codes, ke.codes) and torch.equal(v2.codes, ve.codes)
    assert torch.equal(k2.norms.view(torch.int16), ke.norms.view(torch.int16))
    assert torch.equal(v2.norms.view(torch.int16), ve.norms.view(torch.int16))
    assert (k2.signs is None) == (ke.signs is None)
    if ke.signs is not None:
        assert torch.equal(k2.signs, ke.signs)
    assert torch.equal(pack_slots(lay, k2, v2), slots)
    if lay.padding:
        assert torch.all(slots[..., -lay.padding:] == 0)


def test_norms_are_little_endian_fp16_at_offset_zero():
    codec = LayerCodec.create(PRESETS["tq4-mse"], 64, 1)
    k = torch.zeros(1, 1, 64)
    k[0, 0, 0] = 3.0
    slots = pack_slots(PRESETS["tq4-mse"].layout(64), codec.key.encode(k), codec.value.encode(k))
    assert bytes(slots[0, 0, :2].tolist()) == torch.tensor([3.0], dtype=torch.float16).numpy().tobytes()


def test_unpack_rejects_wrong_slot_size():
    lay = PRESETS["tq4"].layout(64)
    with pytest.raises(ValueError, match="68 bytes"):
        unpack_slots(lay, torch.zeros(2, 70, dtype=torch.uint8))


def test_sketch_variants_size_their_signs():
    """m sketch rows → m/8 sign bytes: 2 rows of d 64 = 16 bytes, the outlier half 4."""
    assert SKETCH_VARIANTS["rows2"].layout(64).key.signs.nbytes == 16
    assert SKETCH_VARIANTS["outlier-half"].layout(64).key.signs.nbytes == 4
    assert SKETCH_VARIANTS["rows2"].bits_per_coord(64)[0] == 3 + 2 + 0.5
