"""Triton kernels for the GPU decode step: one launch per fused stage, no host syncs, so a step replays as a graph.

A decode step is memory-bound (it reads every weight once for a few dozen tokens), so the time that is not weight
reads is launch count: these kernels fuse what eager PyTorch runs as many small ops.
- `add_rmsnorm`: residual add + RMSNorm (HF numerics: fp32 statistics, bf16 rounding where HF rounds).
- `rope_cache`: RoPE on q and k from the packed qkv GEMM output, k/v written into the KV cache at the current slot.
- `decode_attention`: one query token against the cache, the G query heads of a KV head together (online softmax).
- `silu_mul`: SwiGLU's silu(gate) * up from the packed gate_up GEMM output.
- `sample_rows`: logsumexp + greedy or Gumbel-max draw + logprob of the drawn token + stop bookkeeping in one pass
  over the logits (row chunks in parallel, then one combine); the random numbers are Philox keyed by
  (seed + step, row, column).
The slot / step counters live in device memory (`ctr = [slot, col]`) so the same launches serve every step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------- norm


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * n + offs, mask=m, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * n + offs, x, mask=m)
    xf = x.to(tl.float32)
    y = (xf * (1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + row * n + offs, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, rounded to x's dtype), return RMSNorm(x) * weight. x: [B, n] contiguous."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    _add_rmsnorm_kernel[(x.shape[0],)](
        x, x if delta is None else delta, weight, out, n, eps, delta is not None, triton.next_power_of_2(n)
    )
    return out


# ---------------------------------------------------------------------------------------------- rope + cache


@triton.jit
def _round(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, q_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, ctr_ptr, pad_ptr,
    kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)  # 0..H-1: query heads, H..H+KV-1: key/value heads
    dt = q_ptr.dtype.element_ty
    half = tl.arange(0, D // 2)
    slot = tl.load(ctr_ptr)
    pos = tl.maximum(slot - tl.load(pad_ptr + b), 0)
    c = tl.load(cos_ptr + pos * (D // 2) + half).to(tl.float32)
    s = tl.load(sin_ptr + pos * (D // 2) + half).to(tl.float32)
    row = qkv_ptr + b * (H + 2 * KV) * D
    x1 = tl.load(row + h * D + half).to(tl.float32)
    x2 = tl.load(row + h * D + D // 2 + half).to(tl.float32)
    # HF: x * cos + rotate_half(x) * sin, each product and the sum rounded to the model dtype
    o1 = (_round(x1 * c, dt) + _round(-x2 * s, dt)).to(dt)
    o2 = (_round(x2 * c, dt) + _round(x1 * s, dt)).to(dt)
    if h < H:
        tl.store(q_ptr + b * H * D + h * D + half, o1)
        tl.store(q_ptr + b * H * D + h * D + D // 2 + half, o2)
    else:
        j = h - H
        k_dst = kc_ptr + b * kc_sb + j * kc_sh + slot * kc_st
        tl.store(k_dst + half, o1)
        tl.store(k_dst + D // 2 + half, o2)
        d = tl.arange(0, D)
        v = tl.load(row + (H + KV + j) * D + d)
        tl.store(vc_ptr + b * vc_sb + j * vc_sh + slot * vc_st + d, v)


def rope_cache(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    ctr: torch.Tensor,
    pad_len: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k of `qkv` [B, (H+2KV)*d] at each row's position (slot - pad_len), write k, v into the layer's
    cache [B, KV, T, d] at `slot = ctr[0]`; return q [B, H*d]. cos/sin: [T, d/2] tables in the model dtype."""
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty((b, heads * d), device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(b, heads + kv_heads)](
        qkv, q, k_cache, v_cache, cos, sin, ctr, pad_len,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        heads, kv_heads, d,
    )  # fmt: skip
    return q


# ---------------------------------------------------------------------------------------------- attention


@triton.jit
def _decode_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, ctr_ptr, pad_ptr, scale,
    kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    j = tl.program_id(1)  # KV head; it serves query heads j*G .. j*G+G-1
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    qmask = (g < G)[:, None]
    q = tl.load(q_ptr + b * H * D + (j * G + g)[:, None] * D + d[None, :], mask=qmask, other=0.0)
    slot = tl.load(ctr_ptr)
    pad = tl.load(pad_ptr + b)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    k_base = kc_ptr + b * kc_sb + j * kc_sh
    v_base = vc_ptr + b * vc_sb + j * vc_sh
    for start in range((pad // BLOCK_N) * BLOCK_N, slot + 1, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = (n >= pad) & (n <= slot)
        k = tl.load(k_base + n[:, None] * kc_st + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * vc_st + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * H * D + (j * G + g)[:, None] * D + d[None, :], out, mask=qmask)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctr: torch.Tensor, pad_len: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token per row (q [B, H*d]) over cache slots pad_len[b] .. ctr[0]; returns [B, H*d]."""
    b, kv, _, d = k_cache.shape
    heads = q.shape[1] // d
    g = heads // kv
    out = torch.empty_like(q)
    _decode_attention_kernel[(b, kv)](
        q, k_cache, v_cache, out, ctr, pad_len, d**-0.5,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        heads, g, max(16, triton.next_power_of_2(g)), d, 64, q.dtype == torch.float32,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- mlp


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dt = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + row * 2 * n + offs, mask=m, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * n + n + offs, mask=m, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), dt)
    tl.store(out_ptr + row * n + offs, (act * up).to(dt), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] of shape [B, 2n]; returns [B, n]."""
    b, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty((b, n), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(n, block))](gate_up, out, n, block)
    return out


# ---------------------------------------------------------------------------------------------- sampling


@triton.jit
def _sample_partial_kernel(
    logits_ptr, draw_ptr, stride_l, stride_d, V, temp_ptr, seed_ptr, ctr_ptr, part_ptr, S,
    GREEDY: tl.constexpr, SEPARATE_DRAW: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One (row, chunk of CHUNK columns): running max and sum of exp (logsumexp), and the best draw key."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    seed = tl.load(seed_ptr) + tl.load(ctr_ptr + 1)
    inv_t = 1.0 / tl.load(temp_ptr)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.zeros([], tl.int32)
    for start in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        msk = offs < V
        x = tl.load(logits_ptr + b * stride_l + offs, mask=msk, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        if GREEDY:
            key = x
        else:
            if SEPARATE_DRAW:
                x = tl.load(draw_ptr + b * stride_d + offs, mask=msk, other=float("-inf")).to(tl.float32)
            u = tl.rand(seed, b * V + offs)
            key = tl.where(msk, x * inv_t - tl.log(-tl.log(u)), float("-inf"))
        blk_best = tl.max(key, 0)
        blk_i = tl.argmax(key, 0).to(tl.int32) + start
        best_i = tl.where(blk_best > best, blk_i, best_i)  # strictly greater: the first maximum wins, as argmax
        best = tl.maximum(best, blk_best)
    out = part_ptr + (b * S + c) * 4
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, best)
    tl.store(out + 3, best_i.to(tl.float32))  # exact: vocabularies are far below 2**24


@triton.jit
def _sample_finish_kernel(
    logits_ptr, stride_l, part_ptr, S, ctr_ptr, done_ptr, stop_ptr, tokens_ptr, logprobs_ptr, last_ptr,
    stride_out, pad_id, SP: tl.constexpr, NSTOP: tl.constexpr,
):  # fmt: skip
    """Per row: combine the chunks, log-prob of the drawn token, record it, update the stop flag."""
    b = tl.program_id(0)
    c = tl.arange(0, SP)
    cm = c < S
    base = part_ptr + (b * S + c) * 4
    m = tl.load(base, mask=cm, other=float("-inf"))
    s = tl.load(base + 1, mask=cm, other=0.0)
    key = tl.load(base + 2, mask=cm, other=float("-inf"))
    idx = tl.load(base + 3, mask=cm, other=0.0)
    big = tl.max(m, 0)
    lse = big + tl.log(tl.sum(s * tl.exp(m - big), 0))
    best_i = tl.sum(tl.where(c == tl.argmax(key, 0), idx, 0.0), 0).to(tl.int32)  # first chunk holding the max
    lp = tl.load(logits_ptr + b * stride_l + best_i).to(tl.float32) - lse
    col = tl.load(ctr_ptr + 1)
    done = tl.load(done_ptr + b) != 0
    tok = tl.where(done, pad_id, best_i).to(tl.int64)
    tl.store(tokens_ptr + b * stride_out + col, tok)
    tl.store(logprobs_ptr + b * stride_out + col, tl.where(done, 0.0, lp))
    hit = done
    for k in tl.static_range(NSTOP):
        hit = hit | (tok == tl.load(stop_ptr + k))
    tl.store(done_ptr + b, hit.to(tl.int8))
    tl.store(last_ptr + b, tok)


def sample_rows(
    logits: torch.Tensor,
    draw: torch.Tensor | None,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    ctr: torch.Tensor,
    done: torch.Tensor,
    stop: torch.Tensor,
    tokens: torch.Tensor,
    logprobs: torch.Tensor,
    last: torch.Tensor,
    pad_id: int,
    greedy: bool,
) -> None:
    """Draw one token per row and record it at column ctr[1] of `tokens`/`logprobs` (see the module docstring).

    logits [B, V]: the raw policy (logprob = log_softmax(logits)[token]); draw: already-filtered logits to draw from
    (top-k/top-p), else the draw is softmax(logits / temperature). done [B] (int8) is updated with `stop` hits; rows
    already done record `pad_id` with logprob 0. last [B]: the drawn tokens, the next step's input.
    Each row is split into chunks of 4096 columns reduced in parallel, then combined (two launches).
    """
    b, v = logits.shape
    chunk = 4096
    s = triton.cdiv(v, chunk)
    part = torch.empty((b, s, 4), device=logits.device, dtype=torch.float32)
    src = logits if draw is None else draw
    _sample_partial_kernel[(b, s)](
        logits, src, logits.stride(0), src.stride(0), v, temperature, seed, ctr, part, s,
        greedy, draw is not None, chunk, 1024,
    )  # fmt: skip
    _sample_finish_kernel[(b,)](
        logits, logits.stride(0), part, s, ctr, done, stop, tokens, logprobs, last, tokens.stride(0), pad_id,
        triton.next_power_of_2(s), stop.numel(),
    )  # fmt: skip
