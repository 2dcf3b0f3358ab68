"""The quality harness's generation tasks and report: data builders, metric, table."""

import math
import sys
from pathlib import Path

import pytest
import torch

EVAL = Path(__file__).resolve().parents[2] / "eval"
sys.path[:0] = [str(EVAL), str(EVAL / "tasks")]

import lm_eval_quality  # noqa: E402
import retrieval_data  # noqa: E402
import retrieval_utils  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tq_vllm.tools.models import fetch_model

    return AutoTokenizer.from_pretrained(fetch_model("smollm2"))


def test_passkey_prompts_have_the_asked_length_and_hide_the_key_at_its_depth(tokenizer):
    lengths = [400, 900]
    recs = retrieval_data.passkey_records(tokenizer, lengths)
    assert [(r["length"], r["depth"]) for r in recs] == [
        (n, d) for n in lengths for d in retrieval_data.DEPTHS]
    keys = set()
    for r in recs:
        n = len(tokenizer(r["prompt"], add_special_tokens=False).input_ids)
        assert r["length"] - 4 <= n <= r["length"], (n, r["length"])
        assert r["answer"].isdigit() and len(r["answer"]) == 5
        needle = retrieval_data.PASSKEY_NEEDLE.format(key=r["answer"]).strip()
        pos = r["prompt"].index(needle)
        assert r["prompt"].count(r["answer"]) == 2  # only the needle names it
        assert r["prompt"].endswith(retrieval_data.PASSKEY_TAIL)
        head = len(retrieval_data.PASSKEY_HEAD)
        body = len(r["prompt"]) - head - len(needle) - len(retrieval_data.PASSKEY_TAIL)
        frac = (pos - head) / body
        assert abs(frac - r["depth"]) < 0.15, (frac, r["depth"])
        keys.add(r["answer"])
    assert len(keys) == len(recs)
    assert retrieval_data.passkey_records(tokenizer, lengths) == recs  # deterministic


def test_passkey_seeds_draw_other_haystacks_and_keys(tokenizer):
    a = retrieval_data.passkey_records(tokenizer, [300], seed=0)
    b = retrieval_data.passkey_records(tokenizer, [300], seed=1)
    heads = [r["prompt"][len(retrieval_data.PASSKEY_HEAD):][:80] for r in (a[0], b[0])]
    assert heads[0] != heads[1]
    assert {r["answer"] for r in a}.isdisjoint({r["answer"] for r in b})


class _FixedLogits:
    """A stand-in model whose next-token logits are one fixed row per position."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __call__(self, ids):
        return type("Out", (), {"logits": self.rows[: ids.shape[1]][None]})


def test_passkey_answer_scores_margin_and_greedy():
    import passkey_strict

    rows = torch.zeros(4, 5)
    rows[1, 3] = 2.0  # after the prompt [0, 1]: token 3 leads token 0..2 by 2 nats
    rows[2, 4], rows[2, 2] = 1.0, 1.5  # then token 2 beats the answer's token 4
    s = passkey_strict.answer_scores(_FixedLogits(rows), [0, 1], [3, 4])
    assert s["margin"] == pytest.approx(2.0)
    assert not s["greedy"]
    lp = torch.log_softmax(rows, -1)
    assert s["logp"] == pytest.approx(float(lp[1, 3] + lp[2, 4]))
    rows[2, 4] = 3.0
    assert passkey_strict.answer_scores(_FixedLogits(rows), [0, 1], [3, 4])["greedy"]


def test_kv_recall_asks_for_a_listed_code():
    recs = retrieval_data.kv_records(5)
    assert recs == retrieval_data.kv_records(5)
    for r in recs:
        name = r["prompt"].rsplit("The code for ", 1)[1].removesuffix(" is")
        assert f"\n{name}: {r['answer']}\n" in r["prompt"]


@pytest.mark.parametrize("generation,hit", [
    (" 12345. Remember", 1), (" 12345", 1), (" 123456", 0), (" the key 54321", 0), ("", 0),
    (" 1234 and 12345", 0)])
def test_score_takes_the_first_number(generation, hit):
    assert retrieval_utils.score("12345", generation) == hit


def test_report_rows():
    base = {"kv_cache_dtype": "auto", "mode": "strict", "kv_tokens": 1000,
            "word_perplexity": 10.0, "bits_per_byte": 1.0, "doc_nll_per_word": [2.0, 3.0, 4.0],
            "passkey_acc": [1, 1, 0, 1], "passkey_length": [100, 100, 200, 200],
            "kv_acc": [1, 0]}
    tq = {**base, "kv_cache_dtype": "tq4", "kv_tokens": 3700, "word_perplexity": 10.5,
          "doc_nll_per_word": [2.1, 3.05, 4.0], "passkey_acc": [1, 0, 0, 0]}
    d, se = lm_eval_quality.paired_delta(tq["doc_nll_per_word"], base["doc_nll_per_word"])
    assert d == pytest.approx(100 * (2.718281828 ** 0.05 - 1), rel=1e-6)
    assert se == pytest.approx(100 * 0.05 / 3 ** 0.5, rel=1e-6)
    assert lm_eval_quality.acc_by_length(tq, "passkey") == {100: 0.5, 200: 0.0}
    md = lm_eval_quality.table([base, tq], "m", 64)
    row = next(line for line in md.splitlines() if "| tq4 |" in line)
    assert f"{lm_eval_quality.bits_per_coord('tq4', 64):.2f}" in row
    assert "+5.13% ± 2.89" in row and "3,700" in row and "| 50% | 0% |" in row


def test_every_dtype_has_a_report_family():
    """The table and plot name each dtype's family: every preset the plugin serves has one."""
    from tq_vllm.config import PRESET_NAMES

    families = {lm_eval_quality.family(n) for n in ["auto", "fp8", *PRESET_NAMES]}
    assert "trellis codes (tq{b}-trellis)" in families and len(families) == 6


def test_fidelity_causal_attention_is_sdpa():
    import attention_fidelity

    t, hq, d = 40, 4, 16
    q, k, v = (torch.randn(t, hq, d) for _ in range(3))
    scores = torch.einsum("lhd,nhd->lhn", q, k) / d ** 0.5
    _, out = attention_fidelity.causal_attention(scores, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fidelity_orders_bit_widths():
    import attention_fidelity

    t, h, g, d = 96, 2, 3, 64
    q = torch.randn(t, h * g, d)
    k, v = torch.randn(t, h, d), torch.randn(t, h, d)
    m4 = attention_fidelity.layer_metrics(q, k, v, "tq4-mse", 0, None)
    m2 = attention_fidelity.layer_metrics(q, k, v, "tq2.5-mse", 0, None)
    assert m4["kl"] < m2["kl"] and m4["logit_rmse"] < m2["logit_rmse"]
    assert m2["out_cos"] < m4["out_cos"] <= 1.0 and 0.0 <= m2["top8"] <= m4["top8"] <= 1.0


def test_throughput_budget_bytes_follow_the_config():
    import bench_throughput

    from tq_vllm.config import get_preset
    from tq_vllm.tools.models import fetch_model

    model = str(fetch_model("smollm2"))  # 30 layers, 3 KV heads, head_dim 64
    assert bench_throughput.bytes_per_token(model, "auto") == 30 * 3 * 2 * 2 * 64
    assert bench_throughput.bytes_per_token(model, "auto", "float32") == 30 * 3 * 2 * 4 * 64
    assert bench_throughput.bytes_per_token(model, "fp8") == 30 * 3 * 2 * 64
    for name in ("tq4", "tq3.5", "tq2.5-qjl"):
        slot = get_preset(name).layout(64).slot_bytes
        assert bench_throughput.bytes_per_token(model, name) == 30 * 3 * slot


def test_kv_bytes_split_the_slot_into_its_parts():
    """The memory report's parts add up to the preset's slot over all layers and heads:
    4-bit codes are d/2 bytes per K and V, QJL keys add d/8 sign bytes and a residual norm."""
    import bench_throughput

    from tq_vllm.config import get_preset
    from tq_vllm.tools.models import fetch_model

    model, heads = str(fetch_model("smollm2")), 30 * 3
    for name in ("tq4", "tq3", "tq4-qjl", "tq2.5-qjl"):
        b = bench_throughput.kv_bytes(model, name)
        assert b["codes"] + b["signs"] + b["norms"] + b["padding"] == b["total"]
        assert b["total"] == heads * get_preset(name).layout(64).slot_bytes
        assert b["bf16"] == heads * 256
        assert (b["signs"] > 0) == name.endswith("qjl")
    tq4 = bench_throughput.kv_bytes(model, "tq4")
    assert tq4["codes"] == heads * 64 and tq4["norms"] == heads * 4
    assert bench_throughput.kv_bytes(model, "tq4-qjl")["signs"] == heads * 8
    auto = bench_throughput.kv_bytes(model, "auto", "float32")
    assert auto["total"] == auto["codes"] == 2 * auto["bf16"]


def test_scaling_table_and_plot(tmp_path):
    """TPOT per context with ratios to ``auto``, and the memory rows (allocated bytes
    over tokens × bytes per token)."""
    import argparse

    import bench_scaling

    def row(dtype, tpots, total, tokens):
        return {"kv_cache_dtype": dtype, "kv_tokens": tokens, "allocated_kv_bytes": tokens * total,
                "bytes_per_token": {"codes": total, "signs": 0, "norms": 0, "padding": 0,
                                    "total": total, "bf16": 2 * total},
                "points": [{"context": n, "tpot_s": t, "ttft_s": 1.0}
                           for n, t in zip((1024, 4096), tpots)]}

    rows = [row("auto", (0.1, 0.2), 100, 1000), row("tq4", (0.1, 0.1), 25, 4000)]
    args = argparse.Namespace(batch=2, new_tokens=32, model_dtype="float32")
    md = bench_scaling.table(rows, args).splitlines()
    assert md[2] == "| kv-cache-dtype | TPOT ms @ 1024 | TPOT ms @ 4096 |"
    assert md[5] == "| tq4 | 100.0 (1.00) | 100.0 (0.50) |"
    assert md[-1].startswith("| tq4 | 25 | 0 | 0 | 0 | 25 | 2.00× | 4,000 |")
    assert md[-1].endswith("| 1.000 |")
    bench_scaling.plot(rows, md[0], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_divergence_counts_kl_and_top1_agreement():
    """``ppl_strict.divergence``: zero KL and full agreement against itself; a moved
    prediction shows in both columns even where the likelihood of the data does not."""
    import ppl_strict

    ref = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]).log()
    assert ppl_strict.divergence(ref, ref) == (0.0, 2)
    moved = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3]]).log()
    kl, agree = ppl_strict.divergence(moved, ref)
    assert agree == 1
    assert kl == pytest.approx(0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.7))
    ids = torch.tensor([5, 2, 1])  # the data's tokens: equally likely under both
    assert ppl_strict.nll(moved, ids) == pytest.approx(ppl_strict.nll(ref, ids))


def test_throughput_table_and_plot_name_modes_and_reruns(tmp_path):
    """Rows of both attention modes with a cached rerun: the table keeps them apart and
    takes both ratios from ``auto``'s row; the plot is written."""
    import argparse

    import bench_throughput

    def row(dtype, att, tps, rerun_tps):
        return {"kv_cache_dtype": dtype, "compiled": True, "attention": att,
                "tokens_per_s": tps, "requests_per_s": 0.1, "ttft_s": 1.0, "tpot_s": 0.2,
                "preemptions": 0, "kv_tokens": 1000,
                "cached_rerun": {"tokens_per_s": rerun_tps, "tpot_s": 0.1}}

    rows = [row("auto", "strict", 4.0, 20.0), row("tq4", "strict", 3.0, 22.0),
            row("tq4", "fast-prefill", 5.0, 30.0)]
    args = argparse.Namespace(kv_budget_mib=None, prompts=8, prompt_words=3000,
                              new_tokens=128, model_dtype="float32")
    md = bench_throughput.table(rows, args).splitlines()
    assert "model in float32" in md[0] and "rerun" in md[0]
    assert "| tq4 | 3.0 | 0.75 |" in md[5] and md[5].endswith("22.0 | 1.10 | 100 |")
    assert "| tq4 (fast-prefill) | 5.0 | 1.25 |" in md[6] and "30.0 | 1.50 |" in md[6]
    bench_throughput.plot(rows, md[0], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_throughput_rounds_take_ratios_within_each_round():
    """``--rounds``: the table names each row's round, and the summary's median ratio is
    taken from per-round ratios (auto 4 then 8 tok/s, tq4 3 then 8: ratios 0.75 and 1.0,
    median 0.88), not from the median tokens/s (6.0 / 5.5)."""
    import argparse

    import bench_throughput

    def row(dtype, rnd, tps):
        return {"kv_cache_dtype": dtype, "compiled": False, "attention": "strict", "round": rnd,
                "tokens_per_s": tps, "requests_per_s": 0.1, "ttft_s": 1.0, "tpot_s": 0.2,
                "preemptions": 0, "kv_tokens": 1000}

    rows = [row("auto", 0, 4.0), row("tq4", 0, 3.0), row("auto", 1, 8.0), row("tq4", 1, 8.0)]
    args = argparse.Namespace(kv_budget_mib=None, prompts=16, prompt_words=100,
                              new_tokens=128, model_dtype="bfloat16")
    md = bench_throughput.table(rows, args).splitlines()
    assert "| eager (round 2) | tq4 | 8.0 | 1.00 |" in md[7]
    summary = bench_throughput.summary(rows).splitlines()
    assert summary[3] == "| eager | tq4 | 2 | 5.5 | 0.88 | 0.75–1.00 |"


def test_tp_equality_compare_finds_the_first_differing_token():
    import tp_equality

    r = tp_equality.compare([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert r == {"prompts": 3, "identical": 1, "first_difference": [1, 2]}
    with pytest.raises(ValueError, match="prompts"):
        tp_equality.compare([[1]], [])


def test_ppl_strict_variant_settings_and_realization_summary(capsys):
    """``@ends/@sink/@jitter`` parse, an unknown ``@`` setting is refused by name, and the
    realization summary averages the jittered rows of a variant beside its plain row."""
    import ppl_strict

    v = ppl_strict.parse_variant("tq4+nc@ends=2@jitter=3")
    assert (v["preset"], v["opts"], v["ends"], v["sink"], v["jitter"]) == ("tq4", {"nc"}, 2, 0, 3)
    with pytest.raises(SystemExit, match="jiter"):
        ppl_strict.parse_variant("tq4@jiter=1")
    rows = [{"variant": "tq4", "delta_pct": 1.0, "kl": 0.02},
            {"variant": "tq4@jitter=1", "delta_pct": 1.5, "kl": 0.021},
            {"variant": "tq4@jitter=2", "delta_pct": 2.5, "kl": 0.023}]
    ppl_strict.print_realizations(rows)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tq4 ")][0]
    assert "+1.00% / 0.0200" in line and "+2.00% ± 0.71 / 0.0220" in line and "(2 " in line


def test_ppl_strict_vtrellis_makes_only_the_values_trellis_codes():
    """``@vtrellis=S``: the values become S-state trellis codes, the keys stay as the
    preset has them (scalar codes rounded with feedback for ``tq3.5``)."""
    import ppl_strict

    p = ppl_strict.variant_preset(ppl_strict.parse_variant("tq3.5@vtrellis=6"))
    base = ppl_strict.get_preset("tq3.5")
    assert p.value.trellis == 6 and p.key == base.key and p.key.trellis == 0
    assert p.layout(64).slot_bytes == base.layout(64).slot_bytes


def test_ppl_strict_fp8_is_vllms_saturating_e4m3_cache():
    """``fp8`` emulates vLLM's fp8 cache (e4m3, scale 1): e4m3 values round-trip, others
    land on the nearest one (3 mantissa bits), beyond ±448 saturates; every layer is
    quantized at 8 bits; options are refused by name."""
    import ppl_strict

    cast = ppl_strict.Fp8Codec().key
    x = torch.tensor([[[0.0, 1.0, -1.125, 448.0, 1000.0, -1e6, 1.0 + 2 ** -5, 3e-3]]])
    y = cast.decode(cast.encode(x))
    # 1 + 2^-5 is under half an e4m3 step (2^-3) from 1; 3e-3 is 1.54 subnormal steps (2^-9)
    assert y.tolist() == [[[0.0, 1.0, -1.125, 448.0, 448.0, -448.0, 1.0, 2 ** -8]]]
    v = ppl_strict.parse_variant("fp8")
    layers = ppl_strict.build_layers(v, 3, 64, calib=None)
    assert sorted(layers) == [0, 1, 2] and ppl_strict.bits_per_coord(v, 3, 64) == 8.0


def test_ppl_strict_per_token_head_caches_are_vllms():
    """``int{4,8}/fp8_per_token_head`` emulate vLLM 0.32's per-token-head caches: int8 codes
    of ``x · 127 / max|x|`` rounded half away from zero, fp8 the e4m3 cast of ``x · 448 /
    max|x|``, int4 16 levels between the min and max of the vector rotated by vLLM's own
    randomized Hadamard transform, the zero point in the scale's 4 low mantissa bits; the
    float32 scale per token and head is counted in the bits; options are refused."""
    import ppl_strict

    x = torch.tensor([[[1.0, -0.51, 0.25, 0.0031, -1.0, 0.7, 0.1, -0.3]]])
    q, scale = ppl_strict.PerTokenHeadCast("int8_per_token_head").encode(x)
    assert q.tolist() == [[[127, -65, 32, 0, -127, 89, 13, -38]]]
    assert scale.item() == pytest.approx(1 / 127)
    fp8 = ppl_strict.PerTokenHeadCast("fp8_per_token_head")
    q, scale = fp8.encode(x)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().max().item() == 448.0
    assert torch.allclose(fp8.decode((q, scale)), x, rtol=2 ** -4, atol=1e-3)

    int4 = ppl_strict.PerTokenHeadCast("int4_per_token_head")
    v = torch.randn(200, 2, 64, generator=torch.Generator().manual_seed(0))
    signs, h = int4._rht(64)
    y = (v * signs) @ h
    q, packed = int4.encode(v)
    zp = packed.view(torch.int32) & 15
    step = (packed.view(torch.int32) & -16).view(torch.float32)
    assert ((q + zp).min() >= 0) and ((q + zp).max() <= 15) and (q == q.round()).all()
    assert ((q * step - y).abs() <= step * (1 + 1e-5)).all()  # within one level (clamped ends)
    err = ((int4.decode((q, packed)) - v) ** 2).sum() / (v ** 2).sum()
    assert 0.004 < err < 0.012  # 16 levels over a 64-coordinate Gaussian's range
    try:
        from vllm.v1.attention.ops.int4_per_token_head import single_rht
    except ImportError:
        single_rht = None
    if single_rht is not None:  # the rotation is vLLM's, signs and order included
        assert torch.allclose(single_rht(v), y, atol=1e-4)

    for name, bits in (("int4_per_token_head", 4.5), ("int8_per_token_head", 8.5)):
        var = ppl_strict.parse_variant(name)
        assert ppl_strict.bits_per_coord(var, 3, 64) == bits
        assert sorted(ppl_strict.build_layers(var, 3, 64, calib=None)) == [0, 1, 2]
    with pytest.raises(SystemExit, match="takes no options"):
        ppl_strict.main(["int4_per_token_head+nc", "--docs", "1"])


def test_ppl_strict_trellis_search_runs_on_the_cpu_kernel():
    """Where the native library builds, the emulation searches trellis codes with it: the
    same codes as the reference (tests/kernels/test_cpu_ops.py), far faster."""
    import ppl_strict

    from tq_vllm import trellis
    from tq_vllm.kernels import cpu_native

    ref = trellis.encode
    try:
        native = ppl_strict.use_native_trellis_search()
        assert native == (cpu_native.load_trellis() is not None)
        tab = torch.randn(1 << 9) * 0.2
        u = torch.randn(5, 16) * 0.25
        assert torch.equal(trellis.encode(u, tab, 3, 6), ref(u, tab, 3, 6))
    finally:
        trellis.encode = ref
