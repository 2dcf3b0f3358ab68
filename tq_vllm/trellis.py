"""Bitshift-trellis codes: the same bits per coordinate, up to 2 dB less distortion.

A scalar Lloyd–Max quantizer (:mod:`tq_vllm.codebook`) spends ``R`` bits on each rotated
coordinate independently; at 4 bits it sits 3.9 dB from the rate-distortion bound of a
Gaussian source. A trellis code spends the same ``R`` bits per coordinate, but the value a
coordinate decodes to depends on the ``S`` stream bits before its own (QTIP's bitshift
trellis, Tseng et al. 2024): coordinate ``i`` of a group decodes to ``table[w_i]`` with the
window

    w_i = (c_i << S) | bits [R·i − S, R·i) of the group's LSB-first code stream

(stream bits before the group's first code are zero: the table entries with those
windows are the first coordinate's own codebook). The encoder picks the whole code
sequence with the Viterbi algorithm over the ``2**S`` states (the last ``S`` stream bits).
A tail-biting variant (windows read the stream cyclically, two-pass Viterbi) was measured
and lost (tables of 16 iterations): 1.63 vs 1.86 dB at 4 bits and 64 coordinates, 1.23 vs
1.38 dB at 3 bits and 32.
Storage is unchanged — ``R`` bits per coordinate in the same bitstream as scalar codes — and
decoding stays one table lookup per coordinate from a window of ``S + R`` stream bits, which
is what makes it a candidate for the decode kernels. The ``2**(S + R)`` table entries are
trained by generalized Lloyd iterations (Viterbi assignment, then each entry the mean of
the coordinates it decoded) on uniformly random unit vectors of the group's dimension;
the presets' shapes ship trained (:data:`SHIPPED_TABLES`), any other shape is trained on
first use.

Keys of ``tq{b}-trellis`` are searched against the calibration queries' second moment
instead of ``‖y − ŷ‖`` (:func:`encode_fed`: each survivor path carries the errors it feeds
forward, LDLQ inside the Viterbi search; docs/quality.md, twelfth round); the decoder
does not change.

Measured on such vectors (:func:`distortion`), 64 states: 2.13 / 1.93 / 1.49 dB below the
Lloyd–Max codebook at 4 / 3 / 2 bits on 64 coordinates, 1.72 / 1.62 / 1.19 dB on 32;
docs/quality.md (seventh and eighth rounds) has what it does to perplexity.
The CPU kernels decode them (a table lookup per coordinate, from its window) and search
them with :func:`encode`'s arithmetic, bit for bit (``kernels/cpu_ops.trellis_search``:
native C++ or Numba), and so do the Triton kernels (``kernels/triton_trellis.py``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

TRAIN_VECTORS = 2048
"""Unit vectors per generalized-Lloyd iteration (fresh ones each time)."""
TRAIN_ITERS = 48
"""Generalized-Lloyd iterations from a random table: at 3 bits, 32 coordinates, 64 states
the gain over Lloyd–Max is 1.38 dB after 16, 1.56 after 32, 1.62 after 48."""


def _check(bits: int, state_bits: int) -> None:
    if not 1 <= bits <= 8 or not bits <= state_bits <= 10:
        raise ValueError(f"trellis codes need 1 ≤ bits ≤ 8 and bits ≤ state bits ≤ 10, got "
                         f"bits={bits}, state bits={state_bits}")


def encode(y: torch.Tensor, table: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """Viterbi codes (uint8 ``[N, n]``) minimising ``‖y − decode(codes)‖²`` for float32
    rows ``y`` ``[N, n]`` (one group's unit-scale coordinates), starting from state 0.

    State ``p`` (the last ``S`` stream bits) splits as ``(hi << R) | t``; code ``c`` leads to
    ``(c << (S − R)) | hi`` through the window ``(c << S) | p``, so the table read as
    ``[c, hi, t]`` holds every branch's value and a step is a broadcast, not a gather.

    The arithmetic is fixed so that a kernel reproduces the codes bit for bit: each branch
    costs ``cost[p] + e·e`` with ``e = y_i − value`` (float32, each operation rounded once,
    no fused multiply-add), a state keeps its first predecessor ``t`` of least cost (strict
    ``<``), and the path ends in the first state of least cost."""
    _check(bits, state_bits)
    n_rows, n = y.shape
    nc, nh = 1 << bits, 1 << (state_bits - bits)
    val = table.to(y.device).float().view(nc, nh, nc)  # [c, hi, t]
    cost = torch.full((n_rows, nh, nc), float("inf"), device=y.device)  # [N, hi, t]
    cost[:, 0, 0] = 0.0
    back = torch.empty((n, n_rows, nc * nh), dtype=torch.uint8, device=y.device)
    for i in range(n):
        err = y[:, i, None, None, None] - val  # [N, c, hi, t]
        total = cost[:, None] + err * err
        best, arg = total.min(-1)  # over t, first of least cost: [N, c, hi]
        back[i] = arg.view(n_rows, -1)
        cost = best.view(n_rows, nh, nc)  # new state (c << (S − R)) | hi, read as [hi', t']
    state = cost.view(n_rows, -1).argmin(-1)
    rows = torch.arange(n_rows, device=y.device)
    codes = torch.empty((n_rows, n), dtype=torch.uint8, device=y.device)
    for i in range(n - 1, -1, -1):
        codes[:, i] = (state // nh).to(torch.uint8)
        state = (state % nh) * nc + back[i][rows, state].long()
    return codes


def padded_tables(tables: list[torch.Tensor]) -> torch.Tensor:
    """The groups' decode tables as one float32 CPU tensor ``[G, max entries]`` (group
    ``g``'s table first, zeros after): the layout the kernels read."""
    out = torch.zeros(len(tables), max(t.numel() for t in tables))
    for g, t in enumerate(tables):
        out[g, : t.numel()] = t.float().cpu()
    return out


FED_CHUNK_ROWS = 2048
"""Rows :func:`encode_fed` searches at once: each keeps a feedback row per state (``2^S × d``
floats), 32 MiB at S = 6, d = 64."""


def check_fed_inputs(y: torch.Tensor, norms: torch.Tensor, head: torch.Tensor,
                     feedback: torch.Tensor, weight: torch.Tensor, tables: list[torch.Tensor],
                     bits: list[int], state_bits: int) -> None:
    """Raise ``ValueError`` naming what is off in :func:`encode_fed`'s arguments (shapes,
    dtypes, group count, table sizes); the kernels' launchers call it too."""
    if y.dim() != 2 or y.dtype != torch.float32:
        raise ValueError(f"trellis feedback search: y must be float32 [N, d], got {y.dtype} "
                         f"{tuple(y.shape)}")
    n_rows, d = y.shape
    groups = len(tables)
    if groups not in (1, 2) or len(bits) != groups or d % groups:
        raise ValueError(f"trellis feedback search: 1 or 2 equal channel groups with one bit "
                         f"width each are needed, got {groups} tables and bits {list(bits)} "
                         f"over {d} coordinates")
    if norms.shape != (n_rows, groups) or head.shape != (n_rows,) or head.is_floating_point():
        raise ValueError(f"trellis feedback search: norms must be [{n_rows}, {groups}] and head "
                         f"an integer [{n_rows}], got {tuple(norms.shape)} and {head.dtype} "
                         f"{tuple(head.shape)}")
    h = feedback.shape[0] if feedback.dim() == 3 else -1
    if feedback.shape != (h, d, d) or weight.shape != (h, d):
        raise ValueError(f"trellis feedback search: feedback must be [H, {d}, {d}] and weight "
                         f"[H, {d}], got {tuple(feedback.shape)} and {tuple(weight.shape)}")
    for b, tab in zip(bits, tables):
        _check(b, state_bits)
        if tab.numel() != 1 << (state_bits + b):
            raise ValueError(f"trellis feedback search: a {b}-bit table with {state_bits} state "
                             f"bits has 2^{state_bits + b} entries, got {tab.numel()}")


def encode_fed(y: torch.Tensor, norms: torch.Tensor, head: torch.Tensor, feedback: torch.Tensor,
               weight: torch.Tensor, tables: list[torch.Tensor], bits: list[int],
               state_bits: int) -> torch.Tensor:
    """Trellis codes (uint8 ``[N, d]``) of rotated rows ``y`` float32 ``[N, d]`` chosen
    against a query weight (per-survivor feedback, the trellis form of LDLQ).

    Group ``g`` (``len(tables)`` contiguous groups of ``d / G`` coordinates, ``bits[g]``
    bits, norm ``norms[:, g]``) decodes coordinate ``i`` to ``n_g · table_g[w_i]``. With
    ``H = U⁻¹U⁻ᵀ`` (``U = diag(u)(I + F)``, :meth:`tq_vllm.codec.TensorQuantizer.set_query_weight`)
    the logit error ``eᵀHe`` of ``e = y − ŷ`` is ``Σ_i a_i² / u_i²`` where ``a_i = t_i − n_g
    v_i`` and the target ``t_i = y_i − Σ_{j<i} a_j F_ji`` carries the earlier errors. The
    Viterbi search minimises ``Σ_i weight_i · a_i²`` (``weight = 1/u²`` of row ``head[r]``):
    each of the ``2^S`` states keeps its survivor path's feedback row, so a branch's target
    is its predecessor's (per-survivor processing: exact along each survivor). Arithmetic
    (float32, each operation rounded once, no fused multiply-add), for kernels to reproduce:
    ``t = y_i − fb[p, i]``, ``a = t − n·value``, cost ``cost[p] + (weight_i · a) · a``; a
    state keeps its first predecessor of least cost, whose row becomes ``fb[p, j] + a · F_ij``
    (``j > i``); each group starts at state 0 with the feedback of the previous groups'
    best paths (first state of least cost). With ``F = 0`` and unit weights this is
    :func:`encode` on ``y_g / n_g`` (in exact arithmetic).

    ``head`` long ``[N]`` picks each row's ``feedback`` ``[H, d, d]`` and ``weight`` ``[H, d]``."""
    check_fed_inputs(y, norms, head, feedback, weight, tables, bits, state_bits)
    n_rows, d = y.shape
    dg = d // len(tables)
    out = torch.empty((n_rows, d), dtype=torch.uint8, device=y.device)
    for r0 in range(0, n_rows, FED_CHUNK_ROWS):
        sl = slice(r0, min(r0 + FED_CHUNK_ROWS, n_rows))
        out[sl] = _encode_fed_rows(y[sl].float(), norms[sl].float(), feedback[head[sl]],
                                   weight[head[sl]].float(), tables, bits, state_bits, dg)
    return out


def _encode_fed_rows(y, norms, fb_mat, weight, tables, bits, state_bits, dg):
    m, d = y.shape
    rows = torch.arange(m, device=y.device)
    ns = 1 << state_bits
    carried = torch.zeros((m, d), device=y.device)  # feedback of the groups already chosen
    codes = torch.empty((m, d), dtype=torch.uint8, device=y.device)
    for g, tab in enumerate(tables):
        a0, r = g * dg, bits[g]
        nc, nh = 1 << r, 1 << (state_bits - r)
        val = (norms[:, g, None] * tab.to(y.device).float()[None]).view(m, nc, nh, nc)  # [N, c, hi, t]
        cost = torch.full((m, ns), float("inf"), device=y.device)
        cost[:, 0] = 0.0
        fb = carried[:, None, a0:].expand(m, ns, d - a0).contiguous()  # [N, state, j ≥ i]
        back = torch.empty((dg, m, ns), dtype=torch.uint8, device=y.device)
        for k in range(dg):
            i = a0 + k
            tgt = (y[:, i, None] - fb[:, :, 0]).view(m, 1, nh, nc)
            err = tgt - val  # [N, c, hi, t]
            total = cost.view(m, 1, nh, nc) + (weight[:, i, None, None, None] * err) * err
            best, arg = total.min(-1)  # first predecessor t of least cost: [N, c, hi]
            back[k] = arg.view(m, ns)
            a = err.gather(-1, arg[..., None]).view(m, ns)
            pred = (torch.arange(nh, device=y.device).view(1, 1, nh) * nc + arg).view(m, ns)
            prev = fb[:, :, 1:].gather(1, pred[..., None].expand(m, ns, d - i - 1))
            fb = prev + a[..., None] * fb_mat[:, i, None, i + 1:]
            cost = best.view(m, ns)  # new state c·NH + hi
        state = cost.argmin(-1)
        carried = torch.zeros_like(carried)
        carried[:, a0 + dg:] = fb[rows, state]
        for k in range(dg - 1, -1, -1):
            codes[:, a0 + k] = (state // nh).to(torch.uint8)
            state = (state % nh) * nc + back[k][rows, state].long()
    return codes


def windows(codes: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """Table indices ``w_i`` (long, same shape) of code rows ``[..., n]``: the code and the
    ``S`` stream bits before it (zeros before the first code)."""
    _check(bits, state_bits)
    c = codes.long()
    w = c << state_bits
    m = 1
    while state_bits - m * bits > -bits:  # earlier codes that reach into the window
        shift = state_bits - m * bits
        prev = torch.nn.functional.pad(c[..., :-m], (m, 0)) if m < c.shape[-1] else torch.zeros_like(c)
        w |= (prev << shift) if shift >= 0 else (prev >> -shift)
        m += 1
    return w & ((1 << (state_bits + bits)) - 1)


def decode(codes: torch.Tensor, table: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """Unit-scale values (float32, same shape) of code rows ``[..., n]``."""
    return table.to(codes.device)[windows(codes, bits, state_bits)]


def _unit_vectors(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


RECIPE = f"v1/{TRAIN_VECTORS}x{TRAIN_ITERS}"
"""Version of the training recipe; shipped tables (:data:`SHIPPED_TABLES`) made by another
recipe are not used."""

SHIPPED_TABLES = Path(__file__).with_name("trellis_tables.pt")
"""The trained tables of every ``tq{b}-trellis`` preset's shapes, shipped with the package
(``python -m tq_vllm.tools.trellis_tables`` writes them; tests retrain two and compare
bit for bit), so no process spends the time a shape takes to train with :func:`encode`
(2 cores: 6 / 11 / 23 s at 2 / 3 / 4 bits over 64 channels, 46 s at 4 bits over 128)."""


def table_key(bits: int, state_bits: int, dim: int) -> str:
    """Name of a table in :data:`SHIPPED_TABLES`."""
    return f"r{bits}s{state_bits}d{dim}"


@lru_cache(maxsize=1)
def shipped_tables() -> dict[str, torch.Tensor]:
    """The tables in :data:`SHIPPED_TABLES` (empty if it is missing or of another recipe)."""
    if not SHIPPED_TABLES.is_file():
        return {}
    data = torch.load(SHIPPED_TABLES, weights_only=True)
    if data.pop("recipe", None) != RECIPE:
        return {}
    return data


def train_table(bits: int, state_bits: int, dim: int, search=None) -> torch.Tensor:
    """Decode table float32 ``[2**(S + R)]`` trained for ``dim``-dimensional unit vectors by
    generalized Lloyd iterations (deterministic: a fixed seed per shape). ``search`` has
    :func:`encode`'s signature and codes (a kernel's bit-identical search is faster)."""
    _check(bits, state_bits)
    search = search or encode
    gen = torch.Generator().manual_seed(0x7E11 + 1000 * bits + 100 * state_bits + dim)
    tab = torch.randn(1 << (state_bits + bits), generator=gen) / dim ** 0.5
    for _ in range(TRAIN_ITERS):
        y = _unit_vectors(TRAIN_VECTORS, dim, gen)
        w = windows(search(y, tab, bits, state_bits), bits, state_bits).flatten()
        total = torch.zeros_like(tab).index_add_(0, w, y.flatten())
        count = torch.zeros_like(tab).index_add_(0, w, torch.ones_like(y.flatten()))
        tab = torch.where(count > 0, total / count.clamp_min(1), tab)
    return tab


@lru_cache(maxsize=None)
def table(bits: int, state_bits: int, dim: int) -> torch.Tensor:
    """Trained decode table, float32 ``[2**(S + R)]``, for ``dim``-dimensional unit vectors:
    the shipped one where there is one, else :func:`train_table` (cached per process)."""
    _check(bits, state_bits)
    shipped = shipped_tables().get(table_key(bits, state_bits, dim))
    if shipped is not None:
        return shipped.clone()
    return train_table(bits, state_bits, dim)


def distortion(bits: int, state_bits: int, dim: int, vectors: int = 4096,
               seed: int = 1) -> float:
    """Mean ``‖x − x̂‖²`` of the trellis code over random unit vectors in ``dim``
    dimensions (held-out samples; compare :func:`tq_vllm.codebook.mse_distortion`)."""
    y = _unit_vectors(vectors, dim, torch.Generator().manual_seed(seed))
    tab = table(bits, state_bits, dim)
    y_hat = decode(encode(y, tab, bits, state_bits), tab, bits, state_bits)
    return float(((y - y_hat) ** 2).sum(-1).mean())
