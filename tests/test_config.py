"""The preset table: names, bits per coordinate and slot bytes pinned."""

import pytest
from pydantic import ValidationError

from tq_vllm.config import PRESET_NAMES, PRESETS, Preset, TensorCodec, get_preset, with_trellis

# (preset, head_dim) -> (key bytes, value bytes, slot bytes), derived by hand from the
# byte map in tq_vllm/layout.py: norms 2 B each, codes d_g*b_g/8, QJL signs d/8.
EXPECTED = {
    ("tq4-mse", 64): (34, 34, 68),
    ("tq4-qjl", 64): (2 + 2 + 24 + 8, 34, 70),
    ("tq3.5-mse", 64): (4 + 16 + 12, 32, 64),
    ("tq3.5-qjl", 64): (6 + 12 + 8 + 8, 32, 66),
    ("tq3-mse", 64): (26, 26, 52),
    ("tq3-qjl", 64): (4 + 16 + 8, 26, 54),
    ("tq2.5-mse", 64): (4 + 12 + 8, 24, 48),
    ("tq2.5-qjl", 64): (6 + 8 + 4 + 8, 24, 50),
    ("tq4-mse", 128): (66, 66, 132),
    ("tq3.5-mse", 128): (4 + 32 + 24, 60, 120),
    ("tq3-qjl", 256): (4 + 64 + 32, 98, 198),
    ("tq4", 64): (34, 34, 68),
    ("tq3.5", 64): (34, 26, 60),  # keys 4 bits, values 3
    ("tq3", 64): (4 + 16 + 12, 4 + 12 + 8, 56),  # keys 4/3 split, values 3/2 split
    ("tq2.5", 64): (26, 18, 44),  # keys 3 bits, values 2
    ("tq4.5", 64): (2 + 2 + 32 + 8, 34, 78),  # tq4 + QJL signs and residual norm
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_slot_bytes_table(key):
    name, d = key
    lay = PRESETS[name].layout(d)
    assert (lay.key.nbytes, lay.value.nbytes, lay.slot_bytes) == EXPECTED[key]
    assert lay.slot_bytes == lay.key.nbytes + lay.value.nbytes + lay.padding


def test_families_and_budgets():
    for b in ("4", "3.5", "3", "2.5"):
        for fam in ("mse", "qjl"):
            p = PRESETS[f"tq{b}-{fam}"]
            assert p.key.code_bits_per_coord == float(b)
            assert p.value.code_bits_per_coord == float(b)
            assert p.key.qjl == (fam == "qjl")
        rec = PRESETS[f"tq{b}"]
        assert rec.family == "recommended"
        assert (rec.key.code_bits_per_coord + rec.value.code_bits_per_coord) / 2 == float(b)
        assert rec.key.code_bits_per_coord >= rec.value.code_bits_per_coord
        assert not rec.key.qjl and rec.key.norm_correction and rec.transform.needs_calibration
    top = PRESETS["tq4.5"]  # tq4 plus the key residual's shrunk orthonormal QJL sketch
    assert top.family == "recommended" and top.transform == PRESETS["tq4"].transform
    assert top.value == PRESETS["tq4"].value and top.sketch == "orthogonal"
    # feedback rounding shapes the residual the sketch quantizes: off under QJL (measured)
    assert top.key == PRESETS["tq4"].key.model_copy(update={"qjl": True, "qjl_shrink": True,
                                                            "feedback": False})
    assert (top.key.code_bits_per_coord + top.value.code_bits_per_coord) / 2 == 4.5
    assert not any(n.startswith("turboquant") for n in PRESET_NAMES)


def test_true_bits_include_norms():
    k, v = PRESETS["tq4-qjl"].bits_per_coord(64)
    assert k == pytest.approx(4 + 8 * 4 / 64)  # two fp16 norms
    assert v == pytest.approx(4 + 8 * 2 / 64)


def test_segments_do_not_overlap_and_norms_aligned():
    for p in PRESETS.values():
        for d in (64, 128, 256):
            lay = p.layout(d)
            segs = []
            for t in (lay.key, lay.value):
                assert t.norms.offset % 2 == 0
                segs += [t.norms, *t.codes] + ([t.signs] if t.signs else [])
            segs.sort(key=lambda s: s.offset)
            assert segs[0].offset == 0
            for a, b in zip(segs, segs[1:]):
                assert a.end == b.offset
            assert lay.slot_bytes % 2 == 0


def test_unsupported_head_dim_names_supported_sizes():
    with pytest.raises(ValueError, match=r"\(64, 128, 256\)"):
        PRESETS["tq4"].layout(96)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="tq3.5-qjl"):
        get_preset("tq9")


def test_frozen_and_validated():
    with pytest.raises(ValidationError):
        PRESETS["tq4"].name = "x"
    with pytest.raises(ValidationError, match="turboquant"):
        Preset(name="turboquant_x", family="mse", budget="4", key=PRESETS["tq4"].key,
               value=PRESETS["tq4"].value)
    with pytest.raises(ValidationError):
        TensorCodec(bits_hi=6, bits_lo=6, split=False)
    with pytest.raises(ValidationError, match="keys only"):
        Preset(name="tqx", family="mse", budget="4", key=PRESETS["tq4"].key,
               value=TensorCodec(bits_hi=3, bits_lo=3, split=False, qjl=True))


def test_key_offset_rule_by_norm_needs_the_offset_choice():
    from tq_vllm.config import KVTransform

    with pytest.raises(ValueError, match="needs key_offset_choice"):
        KVTransform(key_mean=True, key_offset_rule="norm")
    assert KVTransform(key_mean=True, key_offset_choice=True, key_offset_rule="norm")


def test_key_offset_choice_needs_key_mean_removal():
    from tq_vllm.config import KVTransform

    with pytest.raises(ValueError, match="needs key_mean"):
        KVTransform(key_offset_choice=True)
    assert all(p.transform.key_offset_choice == (p.family in ("recommended", "trellis"))
               for p in PRESETS.values())


@pytest.mark.parametrize("budget", ["4", "3.5", "3", "2.5"])
def test_trellis_presets_are_their_scalar_twins_with_trellis_codes(budget):
    """``tq{b}-trellis`` = ``tq{b}`` with 6-state-bit trellis K and V codes: the same
    transforms and the same slot bytes at every head size."""
    rec, tr = PRESETS[f"tq{budget}"], PRESETS[f"tq{budget}-trellis"]
    assert tr.key == rec.key.model_copy(update={"trellis": 6})
    assert tr.value == rec.value.model_copy(update={"trellis": 6})
    assert tr.transform == rec.transform and tr.seed == rec.seed
    assert all(tr.layout(d) == rec.layout(d) for d in (64, 128, 256))


def test_feedback_rounding_is_for_keys():
    """``tq{b}`` and ``tq{b}-trellis`` keys round with feedback (scalar codes one coordinate
    at a time, trellis codes in the search); values cannot, and say so."""
    assert all(PRESETS[f"tq{b}{f}"].key.feedback for b in ("4", "3.5", "3", "2.5")
               for f in ("", "-trellis"))
    assert not any(p.value.feedback for p in PRESETS.values())
    assert not any(p.key.feedback for p in PRESETS.values() if p.family in ("mse", "qjl"))
    assert not with_trellis(PRESETS["tq4-mse"], 6).key.feedback  # keeps what the codec had
    with pytest.raises(ValueError, match="keys only"):
        Preset.model_validate({**PRESETS["tq4"].model_dump(), "value": PRESETS["tq4"].key.model_dump()})


def test_qjl_options_need_a_qjl_sketch_and_size_it():
    with pytest.raises(ValidationError, match="set qjl=True"):
        TensorCodec(bits_hi=4, bits_lo=4, split=False, qjl_shrink=True)
    with pytest.raises(ValidationError, match="needs split=True"):
        TensorCodec(bits_hi=3, bits_lo=3, split=False, qjl=True, qjl_group="outlier")
    codec = TensorCodec(bits_hi=4, bits_lo=3, split=True, qjl=True, qjl_rows=2, qjl_group="outlier")
    assert codec.sketch_dims(64) == (64, 32) and codec.code_bits_per_coord == 3.5 + 1
    assert PRESETS["tq4-qjl"].key.sketch_dims(128) == (128, 128)
