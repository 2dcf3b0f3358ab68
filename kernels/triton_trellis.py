"""Triton Viterbi search for bitshift-trellis codes (jit code only).

Launcher: :func:`tq_vllm.kernels.triton_ops.trellis_search`. Each program searches
``BLOCK_R`` rows (a row: one channel group of one token and KV head) with
:func:`tq_vllm.trellis.encode`'s arithmetic, so the codes are the reference's bit for bit:

* state ``p`` (the last ``S`` stream bits) splits as ``(hi << R) | t``; code ``c`` leads to
  state ``(c << (S − R)) | hi`` through the window ``(c << S) | p``, so the decode table
  read as ``[c, hi, t]`` holds every branch's value and a step is a broadcast of the
  costs ``[hi, t]`` against it, a minimum over ``t``, and a reshape back to the states;
* each branch costs ``cost[p] + e·e`` with ``e = u_i − value`` (float32, each operation
  rounded once: the launch passes ``enable_fp_fusion=False``); a state keeps its first
  predecessor ``t`` of least cost and the path ends in the first state of least cost.

Each step's predecessors go to a uint8 scratch ``[rows, n, 2^S]``; the backward pass
reads one per coordinate.
"""

import triton
import triton.language as tl


@triton.jit
def tq_trellis_search_kernel(u_ptr, tab_ptr, back_ptr, codes_ptr, rows, n,
                             R: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid ``(cdiv(rows, BLOCK_R),)``: codes uint8 ``[rows, n]`` of unit-scale rows ``u``
    float32 ``[rows, n]`` for the decode table ``tab`` float32 ``[2^(S + R)]``; ``back``
    uint8 ``[rows, n, 2^S]`` is scratch."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    r = tl.where(live, r, 0).to(tl.int64)
    NC: tl.constexpr = 1 << R
    NH: tl.constexpr = 1 << (S - R)
    NS: tl.constexpr = 1 << S
    c = tl.arange(0, NC)
    hi = tl.arange(0, NH)
    t = tl.arange(0, NC)
    tab = tl.load(tab_ptr + (c[:, None, None] << S) + (hi[None, :, None] << R) + t[None, None, :])
    state = tl.arange(0, NS)
    cost = tl.where(state[None, :] == 0, 0.0, float("inf")) + tl.zeros((BLOCK_R, NS), tl.float32)
    for i in range(n):
        x = tl.load(u_ptr + r * n + i)  # [BLOCK_R]
        e = x[:, None, None, None] - tab[None, :, :, :]
        tot = tl.reshape(cost, (BLOCK_R, NH, NC))[:, None, :, :] + e * e  # [r, c, hi, t]
        best = tl.min(tot, axis=3)  # [r, c, hi]: new state c·NH + hi
        arg = tl.min(tl.where(tot == best[:, :, :, None], t[None, None, None, :], NC), axis=3)
        tl.store(back_ptr + (r * n + i)[:, None] * NS + state[None, :],
                 tl.reshape(arg, (BLOCK_R, NS)).to(tl.uint8), mask=live[:, None])
        cost = tl.reshape(best, (BLOCK_R, NS))
    least = tl.min(cost, axis=1)
    s = tl.min(tl.where(cost == least[:, None], state[None, :], NS), axis=1)  # first least state
    for k in range(n):
        i = n - 1 - k
        tl.store(codes_ptr + r * n + i, (s // NH).to(tl.uint8), mask=live)
        s = (s % NH) * NC + tl.load(back_ptr + (r * n + i) * NS + s, mask=live, other=0).to(tl.int32)
