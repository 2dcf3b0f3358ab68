"""Interleaved A/B of the native CPU kernels at several git revisions, in one process.

Each revision's ``kernels/csrc`` is compiled with the flags ``kernels/cpu_native.py`` uses,
the libraries are loaded side by side with ctypes, and the same decode, prefill and store
cases run through the working tree's launchers (``kernels/cpu_ops.py``) against each
library in turn, round after round; the best round per case is kept. Separate benchmark
runs on a shared 2-core machine move by ±10%; interleaving in one process cancels most of
that. The revisions' C signatures must be the working tree's (its launchers pass the
arguments). ``WORKTREE`` names the uncommitted sources. The launchers cache each codec's
resolved store and decode calls (with the library's function in them); switching libraries
drops those plans (from 48cbe55, which added the plans, until 2026-12-07 it did not: the
store and decode rows timed the first-listed library in every column). On the 2-core Xeon
host (2026-12-06, before the plans) the library listed first also ran faster, for reasons
not found: run both orders there and count only what wins in both.

    python eval/bench_kernel_ab.py HEAD~1 HEAD [--rounds 5]          # ~2 min

Each library runs its float32 bodies unless ``--amx auto|1`` turns its AMX bodies on (as
``TQ_VLLM_CPU_AMX`` does for the library the plugin loads; ``auto`` is every row where the
products run on vdpbf16ps, as the plugin resolves it); the decode cases then pass bf16
queries, which the AMX bodies need. "in a model" reads 30 layers' caches in turn with a
layer's worth of weights read between two of them, as a decode step inside vLLM does: the
cache comes from memory there, which a cache-resident case does not show.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_reference import build_cache, key_offset, query_weight  # noqa: E402

from tq_vllm.codec import LayerCodec  # noqa: E402
from tq_vllm.config import PRESETS  # noqa: E402
from tq_vllm.kernels import cpu_native, cpu_ops  # noqa: E402

D, KV_HEADS = 64, 3  # SmolLM2's head size and KV heads
LAYERS = 8
MODEL_LAYERS, WEIGHT_MIB = 30, 9  # SmolLM2-135M: 30 layers, ~270 MB of bf16 weights


def build(rev: str, out_dir: Path) -> ctypes.CDLL:
    """The kernel library compiled from ``rev``'s sources (``WORKTREE``: the files as they are)."""
    src_dir = out_dir / rev.replace("/", "_").replace("~", "-")
    src_dir.mkdir()
    sources = []
    for path in (*cpu_native.SOURCES, *cpu_native.HEADERS):
        text = path.read_bytes() if rev == "WORKTREE" else subprocess.run(
            ["git", "show", f"{rev}:kernels/csrc/{path.name}"], cwd=ROOT, check=True,
            capture_output=True).stdout
        (src_dir / path.name).write_bytes(text)
        if path in cpu_native.SOURCES:
            sources.append(str(src_dir / path.name))
    isa = cpu_native.best_isa()
    lib_path = src_dir / "lib.so"
    subprocess.run([cpu_native.find_compiler(), *cpu_native.BASE_FLAGS, *cpu_native.ISAS[isa][0],
                    *sources, "-o", str(lib_path)], check=True, capture_output=True, text=True)
    return cpu_native.bind(ctypes.CDLL(str(lib_path)))


def cases(q_dtype: torch.dtype = torch.float32) -> tuple[list[tuple], list[LayerCodec]]:
    """(label, call, repetitions per round[, calls of the kernel per call]) and the codecs
    they use; decode queries in ``q_dtype``."""
    torch.manual_seed(0)
    out, codecs = [], []
    for name, batch, ctx in (("tq4", 16, 4096), ("tq4", 16, 1024), ("tq3.5", 16, 256), ("tq4", 1, 4096)):
        codec, cache, table, _, _ = build_cache(name, D, KV_HEADS, 16, [ctx] * batch)
        codecs.append(codec)
        q = torch.randn(batch, KV_HEADS * 3, D).to(q_dtype)
        o, lens, t64 = torch.empty_like(q), torch.full((batch,), ctx), table.to(torch.int64)
        out.append((f"decode {name} {batch} x {ctx}",
                    lambda c=codec, ca=cache, t=t64, s=lens, q=q, o=o:
                    cpu_ops.decode(q, ca, t, s, c, 0.125, o),
                    max(3, 100_000 // (batch * ctx))))
    # Qwen2.5-0.5B's grouping: 7 query heads per KV head (2 KV heads)
    codec, cache, table, _, _ = build_cache("tq4", D, 2, 16, [4096] * 8)
    codecs.append(codec)
    q = torch.randn(8, 2 * 7, D).to(q_dtype)
    o, lens, t64 = torch.empty_like(q), torch.full((8,), 4096), table.to(torch.int64)
    out.append(("decode tq4 GQA 7 8 x 4096",
                lambda c=codec, ca=cache, t=t64, s=lens, q=q, o=o: cpu_ops.decode(q, ca, t, s, c, 0.125, o), 3))
    # as in a model: LAYERS caches of 16 x 4096 tokens (~13 MB each, together beyond L3)
    # read in turn, so each layer's cache streams from memory; time per layer
    layers = [build_cache("tq4", D, KV_HEADS, 16, [4096] * 16) for _ in range(LAYERS)]
    codecs += [layer[0] for layer in layers]
    lq = torch.randn(16, KV_HEADS * 3, D).to(q_dtype)
    lo, llens = torch.empty_like(lq), torch.full((16,), 4096)
    tables = [layer[2].to(torch.int64) for layer in layers]

    def all_layers():
        for (codec, cache, *_), table in zip(layers, tables):
            cpu_ops.decode(lq, cache, table, llens, codec, 0.125, lo)
    out.append((f"decode tq4 16 x 4096, per layer of {LAYERS}", all_layers, 1, LAYERS))
    run_model, model_codecs = in_model(q_dtype)
    codecs += model_codecs
    out.append((f"decode tq4 32 x 130-1154 in a model, per layer of {MODEL_LAYERS}", run_model, 1,
                MODEL_LAYERS))
    for name, gqa, lens in (("tq4", 3, [2048]), ("tq4", 7, [1024]), ("tq4", 3, [128] * 16)):
        heads = 2 if gqa == 7 else KV_HEADS
        codec, cache, table, _, _ = build_cache(name, D, heads, 16, lens)
        codecs.append(codec)
        q = torch.randn(sum(lens), heads * gqa, D).to(torch.bfloat16)
        o = torch.empty_like(q)
        qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
        out.append((f"prefill {name} GQA {gqa} {len(lens)} x {lens[0]}",
                    lambda c=codec, ca=cache, t=table, s=torch.tensor(lens), qs=qsl, q=q, o=o:
                    cpu_ops.prefill(q, None, None, ca, t, s, qs, 0, c, 0.125, o, fresh_exact=False), 2))
    for name in ("tq4", "tq3.5"):
        preset = PRESETS[name]
        codec = LayerCodec.create(preset, D, KV_HEADS, key_offset=key_offset(preset, KV_HEADS, D),
                                  key_query_weight=query_weight(preset, KV_HEADS, D))
        codecs.append(codec)
        cache = torch.zeros(300, KV_HEADS, 16, preset.layout(D).slot_bytes, dtype=torch.uint8)
        for n in (1, 16, 2048):  # a batch-1 decode step, batch 16, a prompt chunk
            k, v = (torch.randn(n, KV_HEADS, D, dtype=torch.bfloat16) for _ in range(2))
            slots = torch.randperm(300 * 16)[:n]
            out.append((f"store {name} {n} tokens",
                        lambda k=k, v=v, s=slots, c=codec, ca=cache: cpu_ops.store(k, v, ca, s, c),
                        max(2, 4000 // n)))
    return out, codecs


def in_model(q_dtype: torch.dtype) -> tuple:
    """Decode as a model step runs it at the capacity-bound benchmark's shape (SmolLM2, 32
    requests of 130-1154 tokens, 32-token blocks): MODEL_LAYERS caches in turn, each read after
    WEIGHT_MIB of other bytes (one layer's bf16 weights) went through the caches, as a model's
    GEMMs stream its weights between two attentions. Returns the case's call (which times
    only the decode calls and returns their sum in seconds) and its codecs."""
    torch.manual_seed(1)
    lens = torch.randint(130, 1155, (32,))
    layers = [build_cache("tq4", D, KV_HEADS, 32, lens.tolist()) for _ in range(MODEL_LAYERS)]
    q = torch.randn(32, KV_HEADS * 3, D).to(q_dtype)
    o = torch.empty_like(q)
    weights = torch.ones(MODEL_LAYERS, WEIGHT_MIB * 2**20 // 2, dtype=torch.bfloat16)

    def run() -> float:
        spent = 0.0
        for i, (codec, cache, table, *_) in enumerate(layers):
            weights[i].sum()
            t0 = time.perf_counter()
            cpu_ops.decode(q, cache, table, lens, codec, 0.125, o)
            spent += time.perf_counter() - t0
        return spent
    return run, [layer[0] for layer in layers]


def use_library(lib: ctypes.CDLL, current: list, codecs: list[LayerCodec]) -> None:
    """Make the launchers call ``lib``: the codecs' cached store and decode plans, which hold
    the function of the library they were made with, are dropped."""
    current[0] = lib
    for codec in codecs:
        tab = getattr(codec, "_cpu_tables", None)
        if tab is not None:
            tab.store_plan = tab.decode_plan = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revs", nargs="+", help="git revisions (or WORKTREE); the first is the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--amx", choices=sorted(cpu_native.AMX_MODES), default="0",
                    help="AMX mode of every library (as TQ_VLLM_CPU_AMX; 0: float32 bodies); "
                         "their products on vdpbf16ps where the CPU has no AMX or with dp")
    args = ap.parse_args()
    if cpu_native.best_isa() is None or cpu_native.find_compiler() is None:
        sys.exit("no AVX-512/AVX2 CPU or no C++ compiler: nothing to compare")
    amx = cpu_native.amx_mode_of(args.amx)  # auto as the plugin resolves it
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(rev, Path(tmp)) for rev in args.revs]
        for rev, lib in zip(args.revs, libs):
            # products on AMX tiles where the CPU has them, else on vdpbf16ps (a revision
            # before eddac54 ignores that flag and asks for tiles)
            dp = int(args.amx == "dp" or not cpu_native._cpu_has_amx())
            if amx and (not cpu_native._cpu_has_dp() or lib.tq_amx_enable(amx, dp) != amx):
                sys.exit(f"{rev}: AMX bodies not available here (CPU, build or kernel permission)")
        current = [libs[0]]
        cpu_native._library = lambda: current[0]  # the launchers look the library up per call
        cpu_native.load = lambda: current[0].tq_decode_cpu
        todo, codecs = cases(torch.bfloat16 if amx else torch.float32)
        best: dict[tuple[str, int], float] = {}
        for _ in range(args.rounds):
            for i, lib in enumerate(libs):
                use_library(lib, current, codecs)
                for label, fn, reps, *per in todo:
                    fn()
                    t0, spent = time.perf_counter(), 0.0
                    for _ in range(reps):
                        spent += fn() or 0.0  # a case that times itself returns its seconds
                    dt = (spent or time.perf_counter() - t0) / reps / (per[0] if per else 1) * 1e3
                    best[label, i] = min(best.get((label, i), float("inf")), dt)
    print("| case | " + " | ".join(f"{r} ms" for r in args.revs) + " |")
    print("|---|" + "---|" * len(args.revs))
    for label, *_ in todo:
        base = best[label, 0]
        print(f"| {label} | " + " | ".join(
            f"{best[label, i]:.3f} ({best[label, i] / base:.2f})" for i in range(len(args.revs))) + " |")


if __name__ == "__main__":
    main()
