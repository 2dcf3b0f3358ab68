"""Pack/unpack of slots is bit-exact and matches the config's byte map."""

import pytest
import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS
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


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_slot_roundtrip_bit_exact(name, dim):
    codec = LayerCodec.create(PRESETS[name], dim, num_kv_heads=2)
    lay = PRESETS[name].layout(dim)
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
