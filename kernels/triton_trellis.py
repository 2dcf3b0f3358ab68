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


@triton.jit
def tq_trellis_fed_search_kernel(y_ptr, n_ptr, head_ptr, fbm_ptr, w_ptr, tab_ptr, carry_ptr,
                                 rows_ptr, back_ptr, codes_ptr, carry_out_ptr, rows, a0,
                                 D: tl.constexpr, DG: tl.constexpr, R: tl.constexpr,
                                 S: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid ``(cdiv(rows, BLOCK_R),)``: one channel group (coordinates ``a0 … a0 + DG``) of
    :func:`tq_vllm.trellis.encode_fed` for rotated rows ``y`` float32 ``[rows, D]``: codes
    into ``codes`` uint8 ``[rows, D]`` (the group's columns), and the best path's feedback
    for the later groups into ``carry_out`` ``[rows, D]`` (zeros up to ``a0 + DG``).

    ``n`` float32 ``[rows]`` the group's clamped norms, ``head`` int64 ``[rows]`` into the
    feedback matrices ``fbm`` ``[H, D, D]`` and weights ``w`` ``[H, D]``, ``tab`` the group's
    table ``[2^(S + R)]``, ``carry`` ``[rows, D]`` the earlier groups' feedback. Scratch:
    ``rows_ptr`` float32 ``[rows, 2, 2^S, D]`` (each state's feedback row, double-buffered
    by step parity; gathered by predecessor, so a barrier separates a step's writes from
    the next step's reads), ``back`` uint8 ``[rows, DG, 2^S]``. Arithmetic as the
    reference: ``t = y_i − fb[p, i]``, ``a = t − n·value``, ``cost + (w_i·a)·a``, first
    predecessor of least cost; the winner's row ``fb[p, j] + a·F_ij`` for ``j > i``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    r = tl.where(live, r, 0).to(tl.int64)
    NC: tl.constexpr = 1 << R
    NH: tl.constexpr = 1 << (S - R)
    NS: tl.constexpr = 1 << S
    c = tl.arange(0, NC)
    hi = tl.arange(0, NH)
    t = tl.arange(0, NC)
    j = tl.arange(0, D)
    state = tl.arange(0, NS)
    tab = tl.load(tab_ptr + (c[:, None, None] << S) + (hi[None, :, None] << R) + t[None, None, :])
    n = tl.load(n_ptr + r)
    h = tl.load(head_ptr + r)
    val = n[:, None, None, None] * tab[None, :, :, :]  # [r, c, hi, t]
    start = tl.load(carry_ptr + r[:, None] * D + j[None, :])  # [r, D]
    buf = rows_ptr + r[:, None, None] * (2 * NS * D) + state[None, :, None] * D + j[None, None, :]
    tl.store(buf, start[:, None, :] + tl.zeros((BLOCK_R, NS, D), tl.float32), mask=live[:, None, None])
    tl.debug_barrier()
    cost = tl.where(state[None, :] == 0, 0.0, float("inf")) + tl.zeros((BLOCK_R, NS), tl.float32)
    for k in range(DG):
        i = a0 + k
        cur = rows_ptr + r * (2 * NS * D) + (k % 2) * (NS * D)  # [r]
        nxt = rows_ptr + r * (2 * NS * D) + ((k + 1) % 2) * (NS * D)
        x = tl.load(y_ptr + r * D + i)
        wi = tl.load(w_ptr + h * D + i)
        fbi = tl.load(cur[:, None] + state[None, :] * D + i)  # [r, NS]: each state's fed error
        tgt = tl.reshape(x[:, None] - fbi, (BLOCK_R, NH, NC))
        e = tgt[:, None, :, :] - val  # [r, c, hi, t]
        tot = tl.reshape(cost, (BLOCK_R, NH, NC))[:, None, :, :] + (wi[:, None, None, None] * e) * e
        best = tl.min(tot, axis=3)  # [r, c, hi]: new state c·NH + hi
        arg = tl.min(tl.where(tot == best[:, :, :, None], t[None, None, None, :], NC), axis=3)
        a = tl.sum(tl.where(t[None, None, None, :] == arg[:, :, :, None], e, 0.0), axis=3)
        tl.store(back_ptr + (r * DG + k)[:, None] * NS + state[None, :],
                 tl.reshape(arg, (BLOCK_R, NS)).to(tl.uint8), mask=live[:, None])
        pred = tl.reshape(hi[None, None, :] * NC + arg, (BLOCK_R, NS))  # [r, q]
        a2 = tl.reshape(a, (BLOCK_R, NS))
        fi = tl.load(fbm_ptr + h[:, None] * (D * D) + i * D + j[None, :])  # [r, D]
        later = j[None, None, :] > i
        src = tl.load(cur[:, None, None] + pred[:, :, None] * D + j[None, None, :],
                      mask=later & live[:, None, None], other=0.0)
        tl.store(nxt[:, None, None] + state[None, :, None] * D + j[None, None, :],
                 src + a2[:, :, None] * fi[:, None, :], mask=later & live[:, None, None])
        tl.debug_barrier()
        cost = tl.reshape(best, (BLOCK_R, NS))
    least = tl.min(cost, axis=1)
    s = tl.min(tl.where(cost == least[:, None], state[None, :], NS), axis=1)  # first least state
    fin = rows_ptr + r * (2 * NS * D) + (DG % 2) * (NS * D)
    tail = j[None, :] >= a0 + DG
    out = tl.load(fin[:, None] + s[:, None] * D + j[None, :], mask=tail & live[:, None], other=0.0)
    tl.store(carry_out_ptr + r[:, None] * D + j[None, :], out, mask=live[:, None])
    for kk in range(DG):
        k = DG - 1 - kk
        tl.store(codes_ptr + r * D + a0 + k, (s // NH).to(tl.uint8), mask=live)
        s = (s % NH) * NC + tl.load(back_ptr + (r * DG + k) * NS + s, mask=live, other=0).to(tl.int32)
