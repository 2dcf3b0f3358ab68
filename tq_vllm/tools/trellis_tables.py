"""Train the trellis decode tables of every ``tq{b}-trellis`` shape and ship them.

``python -m tq_vllm.tools.trellis_tables`` writes ``tq_vllm/trellis_tables.pt`` (what
:func:`tq_vllm.trellis.table` reads before training anything): for each trellis preset
and supported head size, each channel group's (bits, state bits, channels). Training is
:func:`tq_vllm.trellis.train_table` with the CPU kernel's search, which returns
:func:`tq_vllm.trellis.encode`'s codes bit for bit, so the tables are the ones the
PyTorch reference would train, in seconds instead of about a minute per shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tq_vllm import trellis
from tq_vllm.config import PRESETS, SUPPORTED_HEAD_DIMS


def preset_shapes() -> list[tuple[int, int, int]]:
    """Sorted (bits, state bits, channels) of every trellis preset's channel groups."""
    shapes = set()
    for preset in PRESETS.values():
        for d in SUPPORTED_HEAD_DIMS:
            lay = preset.layout(d)
            for codec, tlay in ((preset.key, lay.key), (preset.value, lay.value)):
                if codec.trellis:
                    shapes.update((b, codec.trellis, g)
                                  for b, g in zip(tlay.group_bits, tlay.group_dims))
    return sorted(shapes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=trellis.SHIPPED_TABLES)
    args = ap.parse_args(argv)
    from tq_vllm.kernels.cpu_ops import trellis_search

    tables: dict[str, object] = {"recipe": trellis.RECIPE}
    for bits, state_bits, dim in preset_shapes():
        t0 = time.time()
        tables[trellis.table_key(bits, state_bits, dim)] = trellis.train_table(
            bits, state_bits, dim, search=trellis_search)
        print(f"{trellis.table_key(bits, state_bits, dim)}: {time.time() - t0:.1f} s", flush=True)
    torch.save(tables, args.out)
    print(f"{len(tables) - 1} tables → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
