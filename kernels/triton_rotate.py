"""Triton per-row rotation kernel (jit code only): ``o = scale · M_h x`` for every row.

Queries are rotated (and sketched) before decode/prefill and outputs rotated back after.
As batched GEMMs those products change their blocking with the number of rows, and with
it the last bits of every row, so a request's attention would depend on the batch it
shares a step with. One program per (row, query head) reduces in a fixed order instead,
whatever the batch: the decode is batch-invariant end to end (with the fixed KV splits
of :mod:`triton_decode`).
"""

import triton
import triton.language as tl


@triton.jit
def tq_rotate_kernel(x_ptr, m_ptr, o_ptr, m_head_stride, scale,
                     G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                     TRANSPOSE: tl.constexpr):
    """Grid ``(N, Hq)``: ``o[n, q] = scale · M[q // G] @ x[n, q]`` (``Mᵀ`` with
    ``TRANSPOSE``, read in place) for float32 contiguous ``x``/``o`` ``[N, Hq, D]`` and
    ``M`` ``[·, D, D]`` (head stride ``m_head_stride``, 0 for one matrix shared by all
    heads); ``ROWS`` output coordinates per step."""
    n = tl.program_id(0)
    qh = tl.program_id(1)
    row = (n.to(tl.int64) * tl.num_programs(1) + qh) * D
    mat = m_ptr + (qh // G).to(tl.int64) * m_head_stride
    d = tl.arange(0, D)
    x = tl.load(x_ptr + row + d)
    for e0 in tl.static_range(0, D, ROWS):
        e = e0 + tl.arange(0, ROWS)
        if TRANSPOSE:
            mt = tl.load(mat + d[None, :] * D + e[:, None])
        else:
            mt = tl.load(mat + e[:, None] * D + d[None, :])
        tl.store(o_ptr + row + e, tl.sum(mt * x[None, :], axis=1) * scale)
