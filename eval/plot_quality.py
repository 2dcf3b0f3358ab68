"""Pareto plot: perplexity increase vs bits per coordinate, one line per family.

Reads JSON written by ``eval/ppl_strict.py --json`` (one file per model) and groups
the variants by name: the paper's TurboQuant_prod (``tq{b}-qjl``), the same codes with
the QJL term fixed (``tq{b}-qjl+qorth+qshrink``), the paper's TurboQuant_mse
(``tq{b}-mse``), an emulation of vLLM's in-tree recipe (``+gauss`` variants with
``@ends=2``), vLLM's ``fp8`` cache (emulated: e4m3, scale 1), vLLM 0.32's per-token-head
caches (``int4_per_token_head``, ``int8_per_token_head``, ``fp8_per_token_head``, emulated)
and ours (``tq{b}`` and ``tq4.5``; ``tq{b}+nofb``, the same with keys rounded to the nearest
code as until 2026-11-25; ``tq{b}-trellis``, its keys searched against the calibration
queries since the twelfth round, and ``tq{b}+nofb@trellis=6``, the plain trellis search). The y axis is linear below 1% (a Δ
can be ≤ 0 there).

    python eval/plot_quality.py smollm2.json qwen.json --out docs/quality_pareto.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FAMILIES = {
    "paper TurboQuant_prod (QJL)": re.compile(r"^tq[\d.]+-qjl$"),
    "QJL done right (orthonormal rows, shrunk)": re.compile(r"^tq[\d.]+-qjl\+qorth\+qshrink$"),
    "paper TurboQuant_mse": re.compile(r"^tq[\d.]+-mse$"),
    "vLLM in-tree recipe (emulated)": re.compile(r"\+gauss.*@ends=2$"),
    "vLLM fp8 cache (emulated)": re.compile(r"^fp8$"),
    "vLLM int4/int8_per_token_head (emulated)": re.compile(r"^int[48]_per_token_head$"),
    "vLLM fp8_per_token_head (emulated)": re.compile(r"^fp8_per_token_head$"),
    "tq-vllm, keys rounded to the nearest code (tq{b}+nofb)": re.compile(r"^tq[\d.]+\+nofb$"),
    "tq-vllm recommended (tq{b})": re.compile(r"^tq[\d.]+$"),
    "tq-vllm trellis, plain search (tq{b}+nofb@trellis=6)": re.compile(r"^tq[\d.]+\+nofb@trellis=6$"),
    "tq-vllm trellis, searched against the queries (tq{b}-trellis)": re.compile(r"^tq[\d.]+-trellis$"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/quality_pareto.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.results), figsize=(6 * len(args.results), 4.5),
                             squeeze=False)
    for ax, path in zip(axes[0], args.results):
        data = json.loads(path.read_text())
        colors = plt.get_cmap("tab20").colors  # one per family: more families than tab10
        for k, (family, pattern) in enumerate(FAMILIES.items()):
            pts = sorted((r["bits_per_coord"], r["delta_pct"]) for r in data["results"]
                         if pattern.search(r["variant"]) and "delta_pct" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=family, color=colors[(2 * k) % 20 + k // 10])
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("bits per coordinate (K+V average, norms incl., exact layers at 16)")
        ax.set_ylabel("perplexity increase vs exact (%)")
        ax.set_title(f"{data['model']}: strict mode, {data['docs']} × {data['tokens']} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
