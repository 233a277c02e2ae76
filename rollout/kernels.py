"""Triton kernels for the GPU decode step: one launch per fused stage, no host syncs, so a step replays as a graph.

A decode step at a few dozen rows reads every weight once for a few dozen tokens and is a chain of dependent
kernels, most far from the memory's bandwidth (bench/ablate_step.py measures each family's share of the chain), so
these kernels fuse what eager PyTorch runs as many small ops. A decoder layer is six launches: qkv, attention, o,
gate_up, down, rms_prep.
- RMSNorm is applied by the projection that reads it (`RowNorm`, `linear` of a RowNorm: qkv, gate_up scale their
  output rows by rsqrt(mean + eps) in the epilogue). It is written by whoever adds into the residual stream: o in
  its epilogue (`linear_residual`), `rms_prep` for the embeddings (which it gathers itself) and for down's fp32
  K-slice partials; `finish` applies it after a projection that went to cuBLAS. The last layer's `rms_prep` writes
  the final norm's output rows whole, for the lm_head (cuBLAS).
- `rope_attention`: RoPE on q and k from the packed qkv GEMM output, k/v written into the KV cache at the current
  slot, then one query token against the cache, the G query heads of a KV head together (online softmax over the
  raw scores, exponents in base 2).
- `sample_rows`: logsumexp + greedy or inverse-CDF draw + logprob of the drawn token + stop bookkeeping: row chunks
  reduced in parallel (max and sum of exp), then per row one uniform (Philox keyed by (seed + step, row)) picks the
  chunk and a running sum inside it the column.
- `linear`: x @ W.T (+ bias) for decode-sized row counts, optionally with SwiGLU in the epilogue (gate_up -> act),
  x and the weight tiles loaded by the TMA copy engine on Hopper; where x and the whole weight slab of a program fit
  in shared memory (W's qkv and o) the Gluon kernel of `kernels_gluon` runs instead, its weight copied in before
  the wait;
  `linear_residual` cuts long K into slices (more programs) whose fp32 partials `rms_prep` adds in a fixed order;
  larger batches and weights go to cuBLAS.
The slot / step counters live in device memory (`ctr = [slot, col]`) so the same launches serve every step.

Programmatic dependent launch (Hopper and later): every kernel here waits for the previous kernel's writes before it
touches activations, then lets the next one start (`_chain`). What a kernel does before the
wait may read only what no kernel still running writes: `linear` pulls its weight slab into L2 there, `rms_prep` the
next layer's cache slots written by earlier steps, so those reads overlap the kernel before; o, down's `rms_prep`
and the attention load what the kernel just before does not write (the residual stream; the counters, the rotation
and the first cached block).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# `linear` takes batches up to this many rows and weights up to this size; above either the GEMM is bound by
# bandwidth, not latency, and cuBLAS reads faster (an lm_head: 27.6 us vs 33.5 on the H200, bench/RESULTS.md)
LINEAR_MAX_ROWS = 64
LINEAR_MAX_BYTES = 32 * 2**20
# bf16 projections on Hopper load x and the weight through TMA descriptors: W's rollout 0.1967 s vs 0.2036 s with
# pointer loads (x1.035, bench/linear_tile.py, bench/RESULTS.md); fp32 (the exact-match tests) keeps pointer loads
LINEAR_TMA = True
# bf16 projections on Hopper whose weight slab and x fit in shared memory at once (W's qkv and o) run the Gluon kernel
# of `kernels_gluon`, which copies the weight in before its wait (x1.38 per projection in a chain, bench/RESULTS.md)
LINEAR_GLUON = True
# ... with x through a ring of this many K tiles (0: all of x at once). Not for the bytes in flight: a program that
# keeps less shared memory lets the next kernel's programs onto its SM early (o's 137 KB leave room for a gate_up
# program, its 171 KB with all of x did not). W's rollout x1.037-1.039 over all of x, rings of 4 and 6 within 0.4%,
# 2 and 3 slower (bench/ab_kernels.py, bench/RESULTS.md)
LINEAR_GLUON_RING = 5
# The activations a projection reads through TMA (the norms' xg, the attention's output, gate_up's) get at least this
# many rows of memory, the batch's on top, and the projection reads 64-row boxes that stay inside it: a TMA box that
# reaches past a tensor's last row (a compacted batch of 8-32 rows) made W's steps x1.15-1.16 slower than in-bounds
# boxes (bench/ab_kernels.py --group, bench/RESULTS.md)
LINEAR_TMA_MIN_ROWS = 64


def _tma_path(t: torch.Tensor) -> bool:
    """Whether projections read `t` through TMA descriptors (bf16 on Hopper; fp32 keeps pointer loads)."""
    return pdl(t) and LINEAR_TMA and t.dtype != torch.float32


def _activation(m: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """torch.empty((m, n)) in like's dtype; on the TMA path the top rows of a LINEAR_TMA_MIN_ROWS-row buffer."""
    rows = max(m, LINEAR_TMA_MIN_ROWS) if _tma_path(like) else m
    return torch.empty((rows, n), device=like.device, dtype=like.dtype)[:m]


def _tma_box(x: torch.Tensor) -> torch.Tensor:
    """x, or the LINEAR_TMA_MIN_ROWS-row buffer x tops when it is one of `_activation`'s (rows below the batch hold
    garbage: a GEMM's rows are independent, and every store is masked to the batch's rows)."""
    rows = LINEAR_TMA_MIN_ROWS
    if x.shape[0] >= rows or x.storage_offset() or not x.is_contiguous():
        return x
    if x.untyped_storage().nbytes() < rows * x.stride(0) * x.element_size():
        return x
    return x.as_strided((rows, x.shape[1]), x.stride())


@functools.cache
def _pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch as programmatic dependents (compute capability 9.0 and later)."""
    return _pdl(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def _chain(PDL: tl.constexpr):
    """Wait until the previous kernel's writes are visible, then let the next kernel launch. Not the other way
    round: a kernel that released its successor before waiting would let a chain of kernels launch ahead and pile
    their waiting programs onto whichever SMs had room."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptr, row_stride, nrows, row_bytes, ROWS: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for `row_bytes` from each of `nrows` rows `row_stride` bytes apart, one 128-byte line per lane (no
    registers are filled)."""
    r = tl.minimum(tl.arange(0, ROWS), nrows - 1)
    c = tl.minimum(tl.arange(0, LINES) * 128, row_bytes - 1)
    lines = ptr.to(tl.pointer_type(tl.int8)) + r[:, None].to(tl.int64) * row_stride + c[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [lines], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_cache(kc_ptr, vc_ptr, pad_ptr, ctr_ptr, b, kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
                    KV: tl.constexpr, D: tl.constexpr, LINES: tl.constexpr):  # fmt: skip
    """Ask L2 for row b's cached keys and values, every KV head, slots pad .. slot-1 (written by earlier steps)."""
    esize: tl.constexpr = kc_ptr.dtype.element_ty.primitive_bitwidth // 8
    lo, hi = tl.load(pad_ptr + b), tl.load(ctr_ptr)
    for j in tl.static_range(KV):
        for s0 in range(lo, hi, 256):
            n_rows = tl.minimum(256, hi - s0)
            _prefetch_l2(kc_ptr + b * kc_sb + j * kc_sh + s0 * kc_st, kc_st * esize, n_rows, D * esize, 256, LINES)
            _prefetch_l2(vc_ptr + b * vc_sb + j * vc_sh + s0 * vc_st, vc_st * esize, n_rows, D * esize, 256, LINES)


def _cache_args(cache) -> tuple:
    """(k, v, ctr, pad_len, strides..., KV, D, LINES) for `_prefetch_cache`, from (k_cache, v_cache, ctr, pad_len)."""
    kc, vc, ctr, pad_len = cache
    lines = max(1, triton.next_power_of_2(kc.shape[-1] * kc.element_size() // 128))
    return (kc, vc, ctr, pad_len, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            kc.shape[1], kc.shape[-1], lines)  # fmt: skip


# ---------------------------------------------------------------------------------------------- norm


class RowNorm(NamedTuple):
    """An RMSNorm whose row scale is applied after the projection that reads it, so the norm needs no launch of its
    own: `xg` = x * weight (rounded to x's dtype), `sumsq` [T, B] fp32 sums of x**2 over T column tiles of x (the
    producer's tiles: no tile waits for another), and eps. The projection's epilogue multiplies its row b by
    rsqrt(sum_t sumsq[t, b] / n + eps): HF's RMSNorm(x) @ W.T up to where the two round."""

    xg: torch.Tensor
    sumsq: torch.Tensor
    eps: float


@triton.jit
def _row_scale(ss_ptr, rows, M, T, n, eps, TP: tl.constexpr):
    """rsqrt(mean(x**2) + eps) of `rows` from the [T, M] tile sums, added in a fixed order."""
    t = tl.arange(0, TP)[:, None]
    ss = tl.load(ss_ptr + t * M + rows[None, :], mask=(t < T) & (rows[None, :] < M), other=0.0)
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / n + eps)


@triton.jit
def _residual_in(x_ptr, g_ptr, rm, rn, M, N):
    """The residual stream's tile and the next norm's weight for `_residual_out`. Loaded before the kernel's wait:
    the residual's last writer is never the kernel just before (attention precedes o, down precedes rms_prep)."""
    x = tl.load(x_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
    return x, tl.load(g_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)


@triton.jit
def _residual_out(acc, x, g, x_ptr, xg_ptr, ss_ptr, rm, rn, M, N, tile, eps, NORMALIZE: tl.constexpr):
    """x += acc (acc rounded to x's dtype first, as HF adds a projection's output), then the RowNorm of the new x
    over these columns: xg = x * g and the rows' sums of x**2 into sumsq[tile]. x, g: from `_residual_in`.
    NORMALIZE (the tile is whole rows): xg is the normalized rows themselves, rounded as `finish` rounds them."""
    dt = x_ptr.dtype.element_ty
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    x = (x.to(tl.float32) + acc.to(dt).to(tl.float32)).to(dt)
    tl.store(x_ptr + offs, x, mask=msk)
    xf = x.to(tl.float32)
    ss = tl.sum(tl.where(msk, xf * xf, 0.0), axis=1)
    xg = (xf * g[None, :]).to(dt)
    if NORMALIZE:
        xg = (xg.to(tl.float32) * (1.0 / tl.sqrt(ss / N + eps))[:, None]).to(dt)
    tl.store(xg_ptr + offs, xg, mask=msk)
    tl.store(ss_ptr + tile * M + rm, ss, mask=rm < M)


@triton.jit
def _rms_prep_kernel(
    x_ptr, d_ptr, g_ptr, xg_ptr, ss_ptr, M, n, eps, ids_ptr, table_ptr,
    kc_ptr, vc_ptr, ctr_ptr, pad_ptr, kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
    KV: tl.constexpr, D: tl.constexpr, LINES: tl.constexpr, PREFETCH: tl.constexpr,
    HAS_DELTA: tl.constexpr, SPLITS: tl.constexpr, GATHER: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PREFETCH and PDL:
        _prefetch_cache(kc_ptr, vc_ptr, pad_ptr, ctr_ptr, tl.program_id(0), kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
                        KV, D, LINES)  # fmt: skip
    rm = tl.program_id(0) + tl.zeros([1], tl.int32)
    rn = tl.arange(0, BLOCK)
    if GATHER:  # the row is the embedding of the token the kernel before drew: read after the wait
        g = tl.load(g_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)
        _chain(PDL)
        x = tl.load(table_ptr + tl.load(ids_ptr + rm)[:, None] * n + rn[None, :], mask=rn[None, :] < n, other=0.0)
    else:
        x, g = _residual_in(x_ptr, g_ptr, rm, rn, M, n)
        _chain(PDL)
    acc = tl.zeros([1, BLOCK], tl.float32)
    if HAS_DELTA:
        for s in tl.static_range(SPLITS):  # fp32 partial sums over K slices: added in slice order
            acc += tl.load(d_ptr + (s * M + rm[:, None]) * n + rn[None, :], mask=rn[None, :] < n, other=0.0).to(
                tl.float32
            )
    _residual_out(acc, x, g, x_ptr, xg_ptr, ss_ptr, rm, rn, M, n, 0, eps, NORMALIZE)


def rms_prep(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    cache: tuple | None = None,
    embed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RowNorm:
    """x += delta (in place, delta rounded to x's dtype), and the RowNorm of the new x [B, n] (one tile). delta:
    [B, n], or fp32 partial sums [S, B, n] added in order first. cache: (k_cache, v_cache, ctr, pad_len) of the
    layer that reads this norm: its slots below ctr[0] (written by earlier steps) are asked into L2 before the wait,
    while the projection before streams its weights, so that layer's attention reads them from L2 (W's rollout
    x1.033 over no prefetch, x1.012 over the attention asking for them itself: bench/RESULTS.md). embed: (ids [B],
    table [V, n]): x's rows become table[ids] first (a decode step's embedding gather, no launch of its own; x's
    contents are not read)."""
    xg, ss = _rms_prep(x, delta, weight, eps, cache, embed, False)
    return RowNorm(xg, ss, eps)


def _rms_prep(x, delta, weight, eps: float, cache, embed, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_prep`'s launch: (xg, sumsq); normalize: xg is the normalized rows (what `finish` makes of a RowNorm)."""
    b, n = x.shape
    xg = _activation(b, n, x)
    ss = torch.empty((1, b), device=x.device, dtype=torch.float32)
    on = pdl(x)
    fetch = cache is not None
    cargs = _cache_args(cache) if fetch else (x, x, x, x, 0, 0, 0, 0, 0, 0, 1, 16, 1)
    ids, table = embed if embed is not None else (x, x)
    _rms_prep_kernel[(b,)](
        x, x if delta is None else delta, weight, xg, ss, b, n, eps, ids, table, *cargs, fetch, delta is not None,
        delta.shape[0] if delta is not None and delta.dim() == 3 else 1, embed is not None, normalize,
        triton.next_power_of_2(n), on, launch_pdl=on,
    )  # fmt: skip
    return xg, ss


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    """One row of HF's RMSNorm: weight * (x * rsqrt(mean(x**2) + eps)), in fp32, rounded to x's dtype before the
    weight's product and after it."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=m, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    y = _round(x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)), dt)
    tl.store(out_ptr + row * n + offs, (y * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(dt), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of x [..., n] in one launch (a prefill's: the decode step's norms are `RowNorm`s). The mean of
    squares is summed in another order than torch's, so an output can differ from HF's by one rounding step."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()  # the final norm's input is x[:, -1], a strided view
    out = torch.empty_like(rows)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, n, eps, triton.next_power_of_2(n))
    return out.view(x.shape)


@triton.jit
def _rope_qk_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, H: tl.constexpr, KV: tl.constexpr, HP: tl.constexpr,
                    D: tl.constexpr):  # fmt: skip
    """One token: its H query heads and KV key heads from the packed qkv row, rotated by the token's cos and sin."""
    r = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)
    c = tl.load(cos_ptr + r * D + half).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + r * D + half).to(tl.float32)[None, :]
    hh = tl.arange(0, HP)[:, None]
    dt = q_ptr.dtype.element_ty
    row = qkv_ptr + r * (H + 2 * KV) * D
    qm = hh < H
    qa, qb = _rope(tl.load(row + hh * D + half, mask=qm, other=0.0).to(tl.float32),
                   tl.load(row + hh * D + D // 2 + half, mask=qm, other=0.0).to(tl.float32), c, s, dt)  # fmt: skip
    tl.store(q_ptr + r * H * D + hh * D + half, qa, mask=qm)
    tl.store(q_ptr + r * H * D + hh * D + D // 2 + half, qb, mask=qm)
    km = hh < KV
    ka, kb = _rope(tl.load(row + (H + hh) * D + half, mask=km, other=0.0).to(tl.float32),
                   tl.load(row + (H + hh) * D + D // 2 + half, mask=km, other=0.0).to(tl.float32), c, s, dt)  # fmt: skip
    tl.store(k_ptr + r * KV * D + hh * D + half, ka, mask=km)
    tl.store(k_ptr + r * KV * D + hh * D + D // 2 + half, kb, mask=km)


def rope_qk(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, L, heads, d] and k [B, L, kv_heads, d] rotated, from a packed qkv GEMM output [B, L, (heads + 2
    kv_heads) * d] and `CausalLM.make_step`'s cos / sin [B, 1, L, d]: HF's q * cos + rotate_half(q) * sin, rounded
    as it rounds (one launch instead of ten)."""
    b, lq, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    q = qkv.new_empty((b, lq, heads, d))
    k = qkv.new_empty((b, lq, kv_heads, d))
    hp = triton.next_power_of_2(max(heads, kv_heads))
    # without fp fusion: with it, one rounded product and the sum become one bf16 FMA (see `_rope`)
    _rope_qk_kernel[(b * lq,)](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), q, k, heads, kv_heads, hp, d, enable_fp_fusion=False
    )
    return q, k


# ---------------------------------------------------------------------------------------------- attention


@triton.jit
def _round(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope(x1, x2, c, s, dt: tl.constexpr):
    """HF's x * cos + rotate_half(x) * sin on the two halves of a head, each product and the sum rounded to dt. As
    written: Triton's fp fusion (on by default) contracts one product and the sum into a single `fma.rn.bf16`, one
    rounding fewer than HF's (sm_90 PTX of `_rope_attention_kernel`: 10 of them; a kernel compiled with
    enable_fp_fusion=False rounds as HF, bench/RESULTS.md)."""
    return (_round(x1 * c, dt) + _round(-x2 * s, dt)).to(dt), (_round(x2 * c, dt) + _round(x1 * s, dt)).to(dt)


# (key slots per loop iteration, warps): bench/attn_tile.py found 64:4 best on W and within 1.5% on the 1.5B shape
# (H200; bench/RESULTS.md); larger blocks do not shorten the per-iteration latency that bounds the kernel
ATTN_TILE = (64, 4)
# A row's cached slots are attended in chunks of this many blocks, each chunk's softmax state merged into the running
# one in chunk order, whoever computes it: so a row's output does not depend on how many programs share its chunks
ATTN_CHUNK_BLOCKS = 4
# A batch of fewer than ATTN_SPLIT_ROWS rows gives each (row, KV head) up to ATTN_SPLIT_ROWS // rows programs (at most
# ATTN_MAX_PARTS), which take its chunks in turn and merge through a scratch buffer: a compacted batch's few rows
# attend over the longest contexts one block after another (W2's 8-row tail, steps 384-767: 0.85 ms per step against
# 0.66 at ~130 slots; split: 0.73, W2 x1.043). W's 64 rows stay one program each (2 parts were x1.03 slower there,
# bench/RESULTS.md)
ATTN_SPLIT_ROWS = 64
ATTN_MAX_PARTS = 4


def attention_parts(rows: int) -> int:
    """Programs per (row, KV head) for a batch of `rows` rows."""
    return max(1, min(ATTN_MAX_PARTS, ATTN_SPLIT_ROWS // rows))


# PARTS and NCH are not specialized: every batch size runs one binary, so a row's output is the same bits in a
# compacted batch as in the batch it came from (the binaries of PARTS as a constant differed in the last bit)
@triton.jit(do_not_specialize=["PARTS", "NCH"])
def _rope_attention_kernel(
    qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, out_ptr, ctr_ptr, pad_ptr, scale,
    kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st, part_ml_ptr, part_acc_ptr, sem_ptr, NCH, PARTS,
    H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row b, KV head j, part q): rotate the G query heads of j and its key; part 0 writes k and v at the
    current slot. The row's slots pad .. slot-1 form chunks of CHUNK blocks; with one working part it attends them
    in order, merging each chunk's softmax state into the new token's; with more, part q takes chunks q, q+PARTS, ...
    into the scratch buffer and counts itself on the (row, head)'s semaphore, and the last to arrive merges every
    chunk in order and resets it. Before the wait it reads what the kernels still running do not write (the
    counters, the rotation at this position, its first block of cached slots: the rms_prep before qkv asked L2 for
    them), so after the wait one round trip to qkv's output stands before the arithmetic."""
    b, j, q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(ctr_ptr).to(tl.int32)
    pad = tl.load(pad_ptr + b).to(tl.int32)
    scale2 = scale * 1.4426950408889634  # the scores stay raw: each exponent is one multiply-add in base 2
    span = CHUNK * BLOCK_N
    start = (pad // BLOCK_N) * BLOCK_N
    nch = tl.cdiv(slot - start, span)
    workers = tl.minimum(nch, PARTS)
    if q < tl.maximum(workers, 1):
        pos = tl.maximum(slot - pad, 0)
        half = tl.arange(0, D // 2)
        c = tl.load(cos_ptr + pos * (D // 2) + half).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * (D // 2) + half).to(tl.float32)[None, :]
        k_base = kc_ptr + b * kc_sb + j * kc_sh
        v_base = vc_ptr + b * vc_sb + j * vc_sh
        kc_a, kc_b, v = _cache_block(k_base, v_base, kc_st, vc_st, start + q * span, pad, slot, D, BLOCK_N)
        _chain(PDL)
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        q1, q2, k1, k2, v_new = _rope_new(qkv_ptr, c, s, b, j, H, KV, G, GP, D)
        if q == 0:
            tl.store(k_base + slot * kc_st + half[None, :], k1)
            tl.store(k_base + slot * kc_st + D // 2 + half[None, :], k2)
            tl.store(v_base + slot * vc_st + d, v_new)
        # the new token's state first, from registers: the chunks read only slots written by earlier steps (no
        # barrier between part 0's cache write and the reads), and the running max starts finite
        m = tl.sum(q1.to(tl.float32) * k1.to(tl.float32) + q2.to(tl.float32) * k2.to(tl.float32), 1)
        acc = tl.zeros([GP, D], tl.float32) + v_new.to(tl.float32)[None, :]
        l_i = tl.full([GP], 1.0, tl.float32)
        out = out_ptr + b * H * D + (j * G + g)[:, None] * D + d[None, :]
        gmask = (g < G)[:, None]
        dt = out_ptr.dtype.element_ty
        if workers <= 1:
            m, l_i, acc = _attend_in_order(q1, q2, m, l_i, acc, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, start,
                                           nch, pad, slot, scale2, GP, D, BLOCK_N, CHUNK, IEEE)  # fmt: skip
            tl.store(out, (acc / l_i[:, None]).to(dt), mask=gmask)
        else:
            head = (b * KV + j) * NCH
            _store_chunks(q1, q2, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, start, nch, q, PARTS, pad, slot, scale2,
                          part_ml_ptr, part_acc_ptr, head, GP, D, BLOCK_N, CHUNK, IEEE)  # fmt: skip
            tl.debug_barrier()  # every thread's partials stored before the count releases them
            if tl.atomic_add(sem_ptr + b * KV + j, 1, sem="acq_rel") == workers - 1:
                m, l_i, acc = _merge_stored(m, l_i, acc, part_ml_ptr, part_acc_ptr, head, nch, scale2, GP, D)
                tl.store(out, (acc / l_i[:, None]).to(dt), mask=gmask)
                tl.atomic_xchg(sem_ptr + b * KV + j, 0)


@triton.jit
def _rope_new(qkv_ptr, c, s, b, j, H, KV, G, GP: tl.constexpr, D: tl.constexpr):
    """Row b's G query heads of KV head j [GP, D/2] x 2 and its key [1, D/2] x 2, rotated by the row's cos and sin
    [1, D/2], and its value [D], from the packed qkv GEMM output."""
    dt = qkv_ptr.dtype.element_ty
    half = tl.arange(0, D // 2)
    g = tl.arange(0, GP)
    gmask = (g < G)[:, None]
    row = qkv_ptr + b * (H + 2 * KV) * D
    qh = row + (j * G + g)[:, None] * D + half[None, :]
    kh = row + (H + j) * D + half[None, :]
    qa, qb = (
        tl.load(qh, mask=gmask, other=0.0).to(tl.float32),
        tl.load(qh + D // 2, mask=gmask, other=0.0).to(tl.float32),
    )
    ka, kb = tl.load(kh).to(tl.float32), tl.load(kh + D // 2).to(tl.float32)
    v_new = tl.load(row + (H + KV + j) * D + tl.arange(0, D))
    q1, q2 = _rope(qa, qb, c, s, dt)
    k1, k2 = _rope(ka, kb, c, s, dt)
    return q1, q2, k1, k2, v_new


@triton.jit
def _cache_block(k_base, v_base, kc_st, vc_st, start, pad, slot, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cached keys (two halves [BLOCK_N, D/2]) and values [BLOCK_N, D] of slots start .. start+BLOCK_N-1, zero
    outside pad .. slot-1."""
    half = tl.arange(0, D // 2)
    n = start + tl.arange(0, BLOCK_N)
    valid = ((n >= pad) & (n < slot))[:, None]
    kp = k_base + n[:, None] * kc_st + half[None, :]
    kc_a = tl.load(kp, mask=valid, other=0.0)
    kc_b = tl.load(kp + D // 2, mask=valid, other=0.0)
    v = tl.load(v_base + n[:, None] * vc_st + tl.arange(0, D)[None, :], mask=valid, other=0.0)
    return kc_a, kc_b, v


# tl.exp's ex2 (no flush to zero) wraps every MUFU in a range check and two multiplies; with raw scores and the
# softmax scale folded into one multiply-add per exponent, a 64-slot block of the loop is 298 instructions instead of
# 404 (sm_90a SASS), and the attention alone costs 0.91 instead of 1.14 us per block (bench/attn_chain.py, RESULTS).
# Weights below 2**-126 flush to zero: a score ~87 below the row's max adds nothing either way
@triton.jit
def _ex2(x):
    """2**x, fp32, subnormal results flushed to zero."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _merge(m, l_i, acc, mc, lc, ac, scale2):
    """Two softmax states (running max of the raw scores [GP], sum [GP], unnormalized output [GP, D]) as one;
    scale2: the softmax scale times log2(e)."""
    m_new = tl.maximum(m, mc)
    a, c = _ex2((m - m_new) * scale2), _ex2((mc - m_new) * scale2)
    return m_new, l_i * a + lc * c, acc * a[:, None] + ac * c[:, None]


@triton.jit
def _store_chunks(
    q1, q2, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, start, nch, q, PARTS, pad, slot, scale2, part_ml_ptr,
    part_acc_ptr, head, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """Part q's chunks (q, q+PARTS, ... of `nch` from `start`; its first block already loaded): each one's softmax
    state into the scratch buffer at row `head` + chunk."""
    span = CHUNK * BLOCK_N
    g = tl.arange(0, GP)
    for ch in range(q, nch, PARTS):
        lo = start + ch * span
        mc, lc, ac, kc_a, kc_b, v = _attend_chunk(q1, q2, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, lo,
                                                  tl.minimum(lo + span, slot), lo + PARTS * span, pad, slot, scale2,
                                                  GP, D, BLOCK_N, IEEE)  # fmt: skip
        tl.store(part_ml_ptr + ((head + ch) * 2) * GP + g, mc)
        tl.store(part_ml_ptr + ((head + ch) * 2 + 1) * GP + g, lc)
        tl.store(part_acc_ptr + (head + ch) * GP * D + g[:, None] * D + tl.arange(0, D)[None, :], ac)


@triton.jit
def _merge_stored(m, l_i, acc, part_ml_ptr, part_acc_ptr, head, nch, scale2, GP: tl.constexpr, D: tl.constexpr):
    """The state (m, l_i, acc) with the `nch` chunk states stored from row `head` merged in, in chunk order (read
    from L2: other programs wrote them)."""
    g = tl.arange(0, GP)
    for ch in range(0, nch):
        mc = tl.load(part_ml_ptr + ((head + ch) * 2) * GP + g, cache_modifier=".cg")
        lc = tl.load(part_ml_ptr + ((head + ch) * 2 + 1) * GP + g, cache_modifier=".cg")
        ac = tl.load(
            part_acc_ptr + (head + ch) * GP * D + g[:, None] * D + tl.arange(0, D)[None, :], cache_modifier=".cg"
        )
        m, l_i, acc = _merge(m, l_i, acc, mc, lc, ac, scale2)
    return m, l_i, acc


@triton.jit
def _attend_in_order(
    q1, q2, m, l_i, acc, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, start, nch, pad, slot, scale2,
    GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """The state (m, l_i, acc) with the `nch` chunks from `start` merged in, one after another (the first block
    already loaded)."""
    span = CHUNK * BLOCK_N
    for ch in range(0, nch):
        lo = start + ch * span
        mc, lc, ac, kc_a, kc_b, v = _attend_chunk(q1, q2, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, lo,
                                                  tl.minimum(lo + span, slot), lo + span, pad, slot, scale2, GP, D,
                                                  BLOCK_N, IEEE)  # fmt: skip
        m, l_i, acc = _merge(m, l_i, acc, mc, lc, ac, scale2)
    return m, l_i, acc


@triton.jit
def _attend_chunk(
    q1, q2, kc_a, kc_b, v, k_base, v_base, kc_st, vc_st, lo, hi, nxt, pad, slot, scale2,
    GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """The softmax state (max of the raw scores, sum, unnormalized output [GP, D], fp32; `scale2` as in `_merge`) of
    the cached slots lo .. hi-1 (lo's block holds a slot of pad .. slot-1, so the max is finite after it), from the
    block at lo already loaded (kc_a, kc_b, v); each iteration loads the next block before it computes on the one it
    holds, the last one the block at `nxt`, which it returns."""
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for blk in range(lo, hi, BLOCK_N):
        valid = (blk + tl.arange(0, BLOCK_N) >= pad) & (blk + tl.arange(0, BLOCK_N) < slot)
        after = tl.where(blk + BLOCK_N < hi, blk + BLOCK_N, nxt)
        nxt_a, nxt_b, nxt_v = _cache_block(k_base, v_base, kc_st, vc_st, after, pad, slot, D, BLOCK_N)
        if IEEE:
            sc = tl.dot(q1, tl.trans(kc_a), input_precision="ieee") + tl.dot(q2, tl.trans(kc_b), input_precision="ieee")
        else:
            sc = tl.dot(q1, tl.trans(kc_a)) + tl.dot(q2, tl.trans(kc_b))
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = _ex2((m_i - m_new) * scale2)
        p = _ex2(sc * scale2 - (m_new * scale2)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        kc_a, kc_b, v = nxt_a, nxt_b, nxt_v
    return m_i, l_i, acc, kc_a, kc_b, v


# each split runner's per-(row, KV head) arrival counters, zero between launches (the last program resets its own)
_SEMAPHORES: dict[tuple, torch.Tensor] = {}


def _semaphores(k_cache: torch.Tensor) -> torch.Tensor:
    """Zeroed int32 counters [B * KV] for the cache `k_cache` is a layer of (its runner's; made outside any capture:
    the engine runs a step eagerly before it captures one)."""
    b, kv = k_cache.shape[:2]
    key = (k_cache.device, k_cache.untyped_storage().data_ptr(), b, kv)
    if key not in _SEMAPHORES:
        _SEMAPHORES[key] = torch.zeros(b * kv, dtype=torch.int32, device=k_cache.device)
    return _SEMAPHORES[key]


def rope_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    ctr: torch.Tensor,
    pad_len: torch.Tensor,
    heads: int,
    parts: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per row: rotate q and k of `qkv` [B, (H+2KV)*d] at each row's position
    (slot - pad_len), write k, v into the layer's cache [B, KV, T, d] at `slot = ctr[0]`, attend over slots
    pad_len[b] .. slot; returns [B, H*d]. cos/sin: [T, d/2] tables in the model dtype. parts: programs per (row, KV
    head), default `attention_parts(B)`; the result is the same for any."""
    b, kv, t, d = k_cache.shape
    g, gp = heads // kv, max(16, triton.next_power_of_2(heads // kv))
    parts = attention_parts(b) if parts is None else parts
    out = _activation(b, heads * d, qkv)
    on = pdl(qkv)
    span = ATTN_CHUNK_BLOCKS * ATTN_TILE[0]
    nch = triton.cdiv(t, span) + 1
    scratch = b * kv * nch if parts > 1 else 1  # one program per (row, head) never touches the scratch
    part_ml = torch.empty((scratch, 2, gp), device=qkv.device, dtype=torch.float32)
    part_acc = torch.empty((scratch, gp, d), device=qkv.device, dtype=torch.float32)
    _rope_attention_kernel[(b, kv, parts)](
        qkv, k_cache, v_cache, cos, sin, out, ctr, pad_len, d**-0.5,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), part_ml, part_acc, _semaphores(k_cache), nch, parts,
        heads, kv, g, gp, d, ATTN_TILE[0], ATTN_CHUNK_BLOCKS, qkv.dtype == torch.float32, on,
        num_warps=ATTN_TILE[1], launch_pdl=on,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- mlp


@triton.jit
def _swiglu(gate, up, dt: tl.constexpr):
    """silu(gate) * up in fp32, rounded where the unfused path rounds: gate and up arrive as dt values, silu is
    rounded to dt before the product."""
    return _round(gate / (1.0 + tl.exp(-gate)), dt) * up


@triton.jit
def _finish_kernel(
    y_ptr, ss_ptr, b_ptr, out_ptr, M, n, T, n_norm, eps,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    _chain(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dt = out_ptr.dtype.element_ty
    width = 2 * n if GLU else n
    y = tl.load(y_ptr + row * width + offs, mask=m, other=0.0).to(tl.float32)
    if GLU:
        up = tl.load(y_ptr + row * width + n + offs, mask=m, other=0.0).to(tl.float32)
    if NORM:
        r = _row_scale(ss_ptr, row + tl.zeros([1], tl.int32), M, T, n_norm, eps, TP)
        y = _round(y * r, dt)
        if GLU:
            up = _round(up * r, dt)
    if HAS_BIAS:
        y = _round(y + tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32), dt)
        if GLU:
            up = _round(up + tl.load(b_ptr + n + offs, mask=m, other=0.0).to(tl.float32), dt)
    if GLU:
        y = _swiglu(y, up, dt)
    tl.store(out_ptr + row * n + offs, y.to(dt), mask=m)


def finish(y: torch.Tensor, norm: RowNorm | None = None, bias: torch.Tensor | None = None, glu: bool = False):
    """The epilogue of a projection computed elsewhere (cuBLAS) as y = xg @ W.T [B, N]: the RowNorm's row scale,
    the bias, and for glu (y = [gate | up]) silu(gate) * up, [B, N/2]. With nothing to do, y itself."""
    if norm is None and bias is None and not glu:
        return y
    b, width = y.shape
    n = width // 2 if glu else width
    out = torch.empty((b, n), device=y.device, dtype=y.dtype)
    ss = y if norm is None else norm.sumsq
    block = 1024
    on = pdl(y)
    _finish_kernel[(b, triton.cdiv(n, block))](
        y, ss, y if bias is None else bias, out, b, n, ss.shape[0], 1 if norm is None else norm.xg.shape[1],
        0.0 if norm is None else norm.eps, norm is not None, bias is not None, glu,
        max(2, triton.next_power_of_2(ss.shape[0])), block, on, launch_pdl=on,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- projections


@triton.jit
def _k_slice(
    x_ptr, w_ptr, x_desc, w_desc, rm, rn, n0, k_lo, k_hi, M, N, K,
    GLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """`_linear_kernel`'s K loop over k_lo .. k_hi: the fp32 tiles x @ W[n0:n0+BN].T and (GLU) of the up half."""
    acc = tl.zeros([BM, BN], tl.float32)
    acc_up = tl.zeros([BM, BN], tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        if TMA:  # slices are whole BK blocks (`_launch`), so a block never crosses into the next slice
            x = x_desc.load([tl.program_id(1) * BM, k0])
            acc = tl.dot(x, w_desc.load([n0, k0]).T, acc)
            if GLU:
                acc_up = tl.dot(x, w_desc.load([N + n0, k0]).T, acc_up)
        else:
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
            wmask = (rn[None, :] < N) & (rk[:, None] < k_hi)
            w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=wmask, other=0.0)
            acc = tl.dot(x, w, acc, input_precision="ieee" if IEEE else None)
            if GLU:
                u = tl.load(w_ptr + (N + rn)[None, :] * K + rk[:, None], mask=wmask, other=0.0)
                acc_up = tl.dot(x, u, acc_up, input_precision="ieee" if IEEE else None)
    return acc, acc_up


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, k_per, ss_in_ptr, T, eps, res_ptr, g_ptr, ss_out_ptr, x_desc, w_desc,
    HAS_BIAS: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, TP: tl.constexpr, RESID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, LINES: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    TMA: tl.constexpr, SLICED: tl.constexpr,
):  # fmt: skip
    """One column tile x one K slice (program ids 0 and 2). GLU: the weight is [gate; up] (2N rows) and the tile is
    silu(gate) * up, rounded where the unfused path rounds. NORM: x is a RowNorm's xg, rows scaled by its sumsq.
    RESID: the tile is added into the residual stream res and writes the next RowNorm's xg (to out) and sums (to
    ss_out). With K slices the output is fp32 partials [S, M, N] (for `rms_prep`). TMA: x and the weight arrive
    through tensor descriptors (x_desc, w_desc: the copy engine fills shared memory, no address arithmetic per
    element; out of range reads as zero)."""
    n0 = tl.program_id(0) * BN
    k_lo = tl.program_id(2) * k_per
    esize: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    if PDL:
        nrows = tl.minimum(BN, N - n0)
        nbytes = tl.minimum(k_per, K - k_lo) * esize
        _prefetch_l2(w_ptr + n0 * K + k_lo, K * esize, nrows, nbytes, BN, LINES)
        if GLU:
            _prefetch_l2(w_ptr + (N + n0) * K + k_lo, K * esize, nrows, nbytes, BN, LINES)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    if RESID and not SLICED:
        res, g = _residual_in(res_ptr, g_ptr, rm, rn, M, N)
    if HAS_BIAS:  # the bias once, with K slice 0
        bmask = (rn < N) & (tl.program_id(2) == 0)
        bias = tl.load(b_ptr + rn, mask=bmask, other=0.0).to(tl.float32)[None, :]
        if GLU:
            bias_up = tl.load(b_ptr + N + rn, mask=bmask, other=0.0).to(tl.float32)[None, :]
    _chain(PDL)
    acc, acc_up = _k_slice(x_ptr, w_ptr, x_desc, w_desc, rm, rn, n0, k_lo, tl.minimum(k_lo + k_per, K), M, N, K,
                           GLU, BM, BN, BK, IEEE, TMA)  # fmt: skip
    if NORM:
        r = _row_scale(ss_in_ptr, rm, M, T, K, eps, TP)[:, None]
        acc = acc * r
        if GLU:
            acc_up = acc_up * r
    if HAS_BIAS:
        acc += bias
        if GLU:
            acc_up += bias_up
    if RESID and not SLICED:
        _residual_out(acc, res, g, res_ptr, out_ptr, ss_out_ptr, rm, rn, M, N, tl.program_id(0), 0.0, False)
    else:
        dt = out_ptr.dtype.element_ty
        if GLU:
            acc = _swiglu(_round(acc, dt), _round(acc_up, dt), dt)
        out = out_ptr + tl.program_id(2) * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc.to(dt), mask=(rm[:, None] < M) & (rn[None, :] < N))


class LinearConfig(NamedTuple):
    """How `linear` tiles one projection: BN output columns per program, BK per K iteration, K cut into `splits`
    slices (fp32 partials, added up by `rms_prep`), software-pipeline stages, warps per program."""

    bn: int
    bk: int
    splits: int
    stages: int
    warps: int


def linear_config(n: int, k: int, glu: bool, residual: bool) -> LinearConfig:
    """The tiling of a decode projection, from bench/decode_gemm.py's sweep on an H200 (bench/RESULTS.md) and
    bench/linear_tile.py's inside W's rollout. 32 weight rows per program (16 gate + 16 up with GLU): every program
    reads all of x, so narrower tiles spend more on x than on weights; where the result is added into the residual
    stream (o and down), K in slices of >= ~1200 (W's down: 4 slices, x1.011-1.015 over 8 in two runs with TMA
    loads); four pipeline stages, three for GLU's two tiles."""
    splits = 1 << min(3, max(0, (k // 1200).bit_length() - 1)) if residual else 1
    return LinearConfig(16 if glu else 32, 128, splits, 3 if glu else 4, 4)


def _cublas(m: int, weight: torch.Tensor) -> bool:
    return m > LINEAR_MAX_ROWS or weight.numel() * weight.element_size() > LINEAR_MAX_BYTES


def _launch(x, weight, bias, n, glu, norm, resid):
    """The `_linear_kernel` launch; returns (out, sumsq): out [M, N] (x's dtype), fp32 partials [S, M, N] for a
    residual projection cut into K slices, or the next RowNorm's xg (then sumsq [T, M])."""
    m, k = x.shape
    cfg = linear_config(n, k, glu, resid is not None)
    ieee, tma = x.dtype == torch.float32, _tma_path(x)
    box = _tma_box(x) if tma else x
    bm, bk = max(16, triton.next_power_of_2(box.shape[0])), 32 if ieee else cfg.bk
    k_per = triton.cdiv(triton.cdiv(k, cfg.splits), bk) * bk
    splits = triton.cdiv(k, k_per)
    grid = (triton.cdiv(n, cfg.bn), triton.cdiv(m, bm), splits)
    if splits > 1:
        out, ss_out = torch.empty((splits, m, n), device=x.device, dtype=torch.float32), x
    else:
        out = _activation(m, n, x)
        ss_out = torch.empty((grid[0], m), device=x.device, dtype=torch.float32) if resid is not None else x
    on = pdl(x)
    if tma and LINEAR_GLUON and splits == 1 and not glu and x.dtype == torch.bfloat16:
        from rollout import kernels_gluon

        if kernels_gluon.fits(m, k, cfg.bn, x.element_size()):
            kernels_gluon.launch(x, weight, bias, out, cfg.bn, norm, resid, ss_out, LINEAR_GLUON_RING, box)
            return out, ss_out
    ss_in = x if norm is None else norm.sumsq
    res, g = resid if resid is not None else (x, x)
    lines = triton.next_power_of_2(triton.cdiv(k_per * weight.element_size(), 128))
    descs = (
        (TensorDescriptor.from_tensor(box, [bm, bk]), TensorDescriptor.from_tensor(weight, [cfg.bn, bk]))
        if tma
        else (x, x)
    )
    _linear_kernel[grid](
        x, weight, weight if bias is None else bias, out, m, n, k, k_per,
        ss_in, ss_in.shape[0], 0.0 if norm is None else norm.eps, res, g, ss_out, *descs,
        bias is not None, glu, norm is not None, max(2, triton.next_power_of_2(ss_in.shape[0])), resid is not None,
        bm, cfg.bn, bk, lines, ieee, on, tma, splits > 1,
        num_warps=cfg.warps, num_stages=cfg.stages, launch_pdl=on,
    )  # fmt: skip
    return out, ss_out


def linear(
    x: torch.Tensor | RowNorm, weight: torch.Tensor, bias: torch.Tensor | None = None, glu: bool = False
) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias), [M, N] in x's dtype; x a RowNorm: its normalized rows. glu: weight (and bias)
    hold [gate; up] and the result is silu(gate) * up, [M, N/2]. Batches above LINEAR_MAX_ROWS rows and weights
    above LINEAR_MAX_BYTES go to cuBLAS (then `finish`)."""
    norm = x if isinstance(x, RowNorm) else None
    x = x.xg if norm is not None else x
    m = x.shape[0]
    if _cublas(m, weight):
        return finish(
            F.linear(x, weight, None if norm is not None else bias), norm, None if norm is None else bias, glu
        )
    return _launch(x, weight, bias, weight.shape[0] // 2 if glu else weight.shape[0], glu, norm, None)[0]


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    next_weight: torch.Tensor,
    eps: float,
    cache: tuple | None = None,
    normalize: bool = False,
) -> RowNorm | torch.Tensor:
    """residual += x @ weight.T (+ bias) in place (the projection rounded to residual's dtype, then the sum, as HF
    adds), and the RowNorm of the new residual for the RMSNorm with weight `next_weight`: in the projection's
    epilogue, or where K is cut into slices (down: more programs) by `rms_prep` over its fp32 partials. (Each
    column tile's last slice adding the partials instead, counted with atomics, was slower: bench/RESULTS.md.)
    normalize: the RMSNorm's output rows themselves instead (the last layer's, for the lm_head), which `rms_prep`
    writes whole where it runs; a projection's epilogue sees only its columns, so then `finish` applies them."""
    if _cublas(x.shape[0], weight):
        delta = F.linear(x, weight, bias)
    else:
        delta, ss = _launch(x, weight, bias, weight.shape[0], False, None, (residual, next_weight))
        if delta.dim() == 2:
            norm = RowNorm(delta, ss, eps)
            return finish(delta, norm) if normalize else norm
    if normalize:
        return _rms_prep(residual, delta, next_weight, eps, cache, None, True)[0]
    return rms_prep(residual, delta, next_weight, eps, cache)


# ---------------------------------------------------------------------------------------------- sampling


@triton.jit
def _online_lse(m, s, x):
    """One block into a running (max, sum of exp(x - max)); blocks of -inf (filtered columns) leave it as it was."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)


@triton.jit
def _sample_partial_kernel(
    logits_ptr, draw_ptr, stride_l, stride_d, V, temp_ptr, part_ptr, S,
    GREEDY: tl.constexpr, SEPARATE_DRAW: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One (row, chunk of CHUNK columns): the logits' running max and sum of exp (the logsumexp), and for a greedy
    row the best logit and its column, else the same max and sum for the draw's distribution (draw / T)."""
    _chain(PDL)
    b = tl.program_id(0)
    c = tl.program_id(1)
    inv_t = 1.0 / tl.load(temp_ptr)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    k2 = tl.full([], float("-inf"), tl.float32)  # best logit, or the draw's max
    k3 = tl.zeros([], tl.float32)  # its column, or the draw's sum of exp
    for start in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        msk = offs < V
        x = tl.load(logits_ptr + b * stride_l + offs, mask=msk, other=float("-inf")).to(tl.float32)
        m, s = _online_lse(m, s, x)
        if GREEDY:
            blk_best = tl.max(x, 0)
            blk_i = (tl.argmax(x, 0) + start).to(tl.float32)  # exact: vocabularies are far below 2**24
            k3 = tl.where(blk_best > k2, blk_i, k3)  # strictly greater: the first maximum wins, as argmax
            k2 = tl.maximum(k2, blk_best)
        else:
            if SEPARATE_DRAW:
                x = tl.load(draw_ptr + b * stride_d + offs, mask=msk, other=float("-inf")).to(tl.float32)
            k2, k3 = _online_lse(k2, k3, x * inv_t)
    out = part_ptr + (b * S + c) * 4
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, k2)
    tl.store(out + 3, k3)


@triton.jit
def _inverse_cdf(src_ptr, V, inv_t, top, chunk_lo, rem, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The first column of the chunk at which the running sum of exp(x / T - top) passes `rem` (the last column
    with weight where rounding leaves it short)."""
    run = tl.zeros([], tl.float32)
    pick = tl.full([], 2**30, tl.int32)
    last = tl.full([], -1, tl.int32)
    for start in range(chunk_lo, chunk_lo + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        msk = offs < V
        e = tl.exp(tl.load(src_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32) * inv_t - top)
        pick = tl.minimum(pick, tl.min(tl.where(tl.cumsum(e, 0) + run > rem, offs, 2**30), 0))
        last = tl.maximum(last, tl.max(tl.where(e > 0, offs, -1), 0))
        run += tl.sum(e, 0)
    return tl.where(pick < 2**30, pick, last)


@triton.jit
def _sample_finish_kernel(
    logits_ptr, draw_ptr, stride_l, stride_d, V, temp_ptr, seed_ptr, part_ptr, S, ctr_ptr, done_ptr, stop_ptr,
    limit_ptr, tokens_ptr, logprobs_ptr, last_ptr, stride_out, pad_id,
    GREEDY: tl.constexpr, SEPARATE_DRAW: tl.constexpr, SP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    NSTOP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Per row: combine the chunks; the drawn token (greedy: the first maximum; else inverse CDF: one uniform picks
    the chunk from the chunks' sums and the column by a running sum inside it), its log-prob, recorded; the stop
    flag updated (a stop token, or the row's cap reached)."""
    _chain(PDL)
    b = tl.program_id(0)
    c = tl.arange(0, SP)
    cm = c < S
    base = part_ptr + (b * S + c) * 4
    m = tl.load(base, mask=cm, other=float("-inf"))
    s = tl.load(base + 1, mask=cm, other=0.0)
    k2 = tl.load(base + 2, mask=cm, other=float("-inf"))
    k3 = tl.load(base + 3, mask=cm, other=0.0)
    big = tl.max(m, 0)
    lse = big + tl.log(tl.sum(s * tl.exp(m - big), 0))
    col = tl.load(ctr_ptr + 1)
    if GREEDY:
        best_i = tl.sum(tl.where(c == tl.argmax(k2, 0), k3, 0.0), 0).to(tl.int32)  # first chunk holding the max
    else:
        top = tl.max(k2, 0)
        w = tl.where(k2 > float("-inf"), k3 * tl.exp(k2 - top), 0.0)
        seed = tl.load(seed_ptr) + col
        target = tl.sum(tl.rand(seed, b + tl.zeros([1], tl.int32)), 0) * tl.sum(w, 0)
        pick = tl.minimum(tl.sum((tl.cumsum(w, 0) <= target).to(tl.int32), 0), S - 1)
        rem = target - tl.sum(tl.where(c < pick, w, 0.0), 0)
        if SEPARATE_DRAW:
            src, inv_t = draw_ptr + b * stride_d, 1.0 / tl.load(temp_ptr)
        else:
            src, inv_t = logits_ptr + b * stride_l, 1.0 / tl.load(temp_ptr)
        best_i = _inverse_cdf(src, V, inv_t, top, pick * CHUNK, rem, CHUNK, BLOCK)
    lp = tl.load(logits_ptr + b * stride_l + best_i).to(tl.float32) - lse
    done = tl.load(done_ptr + b) != 0
    tok = tl.where(done, pad_id, best_i).to(tl.int64)
    tl.store(tokens_ptr + b * stride_out + col, tok)
    tl.store(logprobs_ptr + b * stride_out + col, tl.where(done, 0.0, lp))
    hit = done | (tl.load(limit_ptr + b) <= col + 1)
    for k in tl.static_range(NSTOP):
        hit = hit | (tok == tl.load(stop_ptr + k))
    tl.store(done_ptr + b, hit.to(tl.int8))
    tl.store(last_ptr + b, tok)


# columns per sampling chunk: the draw's second launch walks one chunk after combining all chunks' sums, so smaller
# chunks shorten it until the partials to combine cost more; W's rollout, 1024 against 4096: x1.013 and x1.007 in
# two runs; 2048 x1.002, 512 and 256 slower than 1024 (bench/ab_kernels.py, H200, bench/RESULTS.md)
SAMPLE_CHUNK = 1024


def sample_rows(
    logits: torch.Tensor,
    draw: torch.Tensor | None,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    ctr: torch.Tensor,
    done: torch.Tensor,
    stop: torch.Tensor,
    limit: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    last: torch.Tensor,
    pad_id: int,
    greedy: bool,
) -> None:
    """Draw one token per row and record it at column ctr[1] of `tokens`/`logprobs` (see the module docstring).

    logits [B, V]: the raw policy (logprob = log_softmax(logits)[token]); draw: already-filtered logits to draw from
    (top-k/top-p), else the draw is softmax(logits / temperature). done [B] (int8) is updated with `stop` hits and
    with rows whose cap `limit` [B] (new tokens) is reached at this column; rows already done record `pad_id` with
    logprob 0. last [B]: the drawn tokens, the next step's input.
    Each row is split into chunks of SAMPLE_CHUNK columns reduced in parallel, then combined (two launches); a
    sampled row's draw is the inverse CDF of one uniform (one Philox draw per row, not one per column:
    bench/RESULTS.md).
    """
    b, v = logits.shape
    chunk, block = SAMPLE_CHUNK, min(1024, SAMPLE_CHUNK)
    s = triton.cdiv(v, chunk)
    part = torch.empty((b, s, 4), device=logits.device, dtype=torch.float32)
    src = logits if draw is None else draw
    on = pdl(logits)
    _sample_partial_kernel[(b, s)](
        logits, src, logits.stride(0), src.stride(0), v, temperature, part, s,
        greedy, draw is not None, chunk, block, on, launch_pdl=on,
    )  # fmt: skip
    _sample_finish_kernel[(b,)](
        logits, src, logits.stride(0), src.stride(0), v, temperature, seed, part, s, ctr, done, stop, limit, tokens,
        logprobs, last, tokens.stride(0), pad_id, greedy, draw is not None, triton.next_power_of_2(s), chunk, block,
        stop.numel(), on, launch_pdl=on,
    )  # fmt: skip
