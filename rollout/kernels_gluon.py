"""The decode projections whose weight slab fits in shared memory, in Gluon (Hopper): `rollout.kernels.linear` hands
them here. Each program copies its BN weight rows x all of K into shared memory (TMA, one mbarrier) before the
programmatic-dependent wait, so the copy overlaps the kernel before; after the wait only x arrives, through a ring
of K tiles (one mbarrier per slot, each warpgroup MMA starts on its tile; a slot is refilled once its MMA is done).
Triton's `tl` can only ask L2 for the weight there: in a chain of W's o projections this kernel takes 2.49 µs
against 3.43 (bench/gluon_proj.py, bench/RESULTS.md). The epilogues are `kernels._linear_kernel`'s: the RowNorm's
row scale, the bias, or the residual add with the next RowNorm's xg and sums, rounded where it rounds."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BM, BK = 64, 128
# shared memory a program may take for x and its weight slab (the H200/H100 allow 227 KiB per block)
SMEM_BYTES = 200 * 1024


def fits(m: int, k: int, bn: int, esize: int) -> bool:
    """Whether x [m, k] and a [bn, k] weight slab fit in one program's shared memory at once (the shapes measured;
    with a ring the program holds less of x)."""
    return m <= BM and -(-k // BK) * (BM + bn) * BK * esize <= SMEM_BYTES


@gluon.jit
def _griddep():
    """Wait for the previous kernel's writes, then let the next kernel launch (`kernels._chain`'s order)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)  # fmt: skip


@gluon.jit
def _row_scale(ss_ptr, rm, M, T, K, eps, TP: gl.constexpr):
    """rsqrt(mean(x**2) + eps) of the rows `rm` from the producer's [T, M] tile sums, added in tile order."""
    ss = gl.zeros_like(rm, dtype=gl.float32)
    for t in gl.static_range(TP):
        ss += gl.load(ss_ptr + t * M + rm, mask=(rm < M) & (t < T), other=0.0)
    return 1.0 / gl.sqrt(ss / K + eps)


@gluon.jit
def _residual_out(acc, res, g, res_ptr, xg_ptr, ss_ptr, offs, tile, rm, M):
    """x = res + acc (acc rounded to x's dtype first) into the residual stream, then the next RowNorm over these
    columns: xg = x * g and the rows' sums of x**2 into the program's row of `ss_ptr`."""
    dt: gl.constexpr = res_ptr.dtype.element_ty
    x = (res.to(gl.float32) + acc.to(dt).to(gl.float32)).to(dt)
    gl.store(res_ptr + offs, x, mask=tile)
    xf = x.to(gl.float32)
    gl.store(xg_ptr + offs, (xf * g[None, :]).to(dt), mask=tile)
    gl.store(ss_ptr + gl.program_id(0) * M + rm, gl.sum(gl.where(tile, xf * xf, 0.0), axis=1), mask=rm < M)


@gluon.jit
def _load_x(x_desc, bar, dst, k):
    """x's K tile at column k into a ring slot, counted on its mbarrier."""
    mbarrier.expect(bar, x_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [0, k], bar, dst)


@gluon.jit
def _mma_ring(x_desc, x_smem, x_bar, w_smem, acc, KT: gl.constexpr, XS: gl.constexpr):
    """acc + x @ W.T over KT K tiles, the weight's all in shared memory, x's arriving in a ring of XS slots whose
    first fill is under way; a slot takes tile i + XS once tile i's MMA is done."""
    BKC: gl.constexpr = x_desc.block_type.shape[1]
    for i in gl.static_range(KT):
        mbarrier.wait(x_bar.index(i % XS), phase=(i // XS) % 2)
        acc = warpgroup_mma(x_smem.index(i % XS), w_smem.index(i).permute((1, 0)), acc, is_async=True)
        if i + XS < KT:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _load_x(x_desc, x_bar.index(i % XS), x_smem.index(i % XS), (i + XS) * BKC)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))


@gluon.jit
def _proj_kernel(
    x_desc, w_desc, b_ptr, out_ptr, M, N, ss_in_ptr, T, eps, res_ptr, g_ptr, ss_out_ptr,
    KT: gl.constexpr, XS: gl.constexpr, HAS_BIAS: gl.constexpr, NORM: gl.constexpr, TP: gl.constexpr,
    RESID: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """One program: columns n0 .. n0+BN of x @ W.T for x's (up to) BM rows, K in KT tiles of BK; x arrives through a
    ring of XS tiles (XS = KT: all of it at once)."""
    BMC: gl.constexpr = x_desc.block_type.shape[0]
    BKC: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    K = x_desc.shape[1]
    n0 = gl.program_id(0) * BN
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BN, 16])  # fmt: skip
    rm = gl.arange(0, BMC, layout=gl.SliceLayout(1, layout))
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    tile = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]

    w_smem = gl.allocate_shared_memory(w_desc.dtype, [KT, BN, BKC], w_desc.layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [XS, BMC, BKC], x_desc.layout)
    w_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    x_bar = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(w_bar, count=1)
    for i in gl.static_range(XS):
        mbarrier.init(x_bar.index(i), count=1)
    # before the wait: what the kernel just before does not write (the weight, the bias, the residual stream)
    mbarrier.expect(w_bar, KT * w_desc.block_type.nbytes)
    for i in gl.static_range(KT):
        tma.async_copy_global_to_shared(w_desc, [n0, i * BKC], w_bar, w_smem.index(i))
    if HAS_BIAS:
        bias = gl.load(b_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)
    if RESID:
        res = gl.load(res_ptr + offs, mask=tile, other=0.0)
        g = gl.load(g_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)
    _griddep()
    for i in gl.static_range(XS):
        _load_x(x_desc, x_bar.index(i), x_smem.index(i), i * BKC)
    if NORM:
        r = _row_scale(ss_in_ptr, rm, M, T, K, eps, TP)
    mbarrier.wait(w_bar, phase=0)
    acc = _mma_ring(x_desc, x_smem, x_bar, w_smem, gl.zeros([BMC, BN], gl.float32, layout=layout), KT, XS)
    mbarrier.invalidate(w_bar)
    for i in gl.static_range(XS):
        mbarrier.invalidate(x_bar.index(i))
    if NORM:
        acc = acc * r[:, None]
    if HAS_BIAS:
        acc = acc + bias[None, :]
    dt: gl.constexpr = out_ptr.dtype.element_ty
    if RESID:
        _residual_out(acc, res, g, res_ptr, out_ptr, ss_out_ptr, offs, tile, rm, M)
    else:
        gl.store(out_ptr + offs, acc.to(dt), mask=tile)


def launch(x, weight, bias, out, bn: int, norm, resid, ss_out, ring: int, box) -> None:
    """out = x @ weight.T with `kernels.linear`'s epilogues (norm: a RowNorm whose xg is x; resid: (residual,
    next norm weight), then out is the next xg and ss_out its [N / bn, M] sums); x through a ring of `ring` K tiles
    (0: all of them), its TMA boxes taken from `box` (x, or the taller buffer x tops: `kernels._tma_box`). Caller
    checks `fits`."""
    m, k = x.shape
    n, kt = weight.shape[0], -(-k // BK)
    lay_x = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16)
    lay_w = gl.NVMMASharedLayout.get_default_for([bn, BK], gl.bfloat16)
    x_desc = TensorDescriptor.from_tensor(box, [BM, BK], lay_x)
    w_desc = TensorDescriptor.from_tensor(weight, [bn, BK], lay_w)
    ss_in = x if norm is None else norm.sumsq
    res, g = resid if resid is not None else (x, x)
    tp = 1
    while tp < ss_in.shape[0]:
        tp *= 2
    _proj_kernel[(-(-n // bn),)](
        x_desc, w_desc, weight if bias is None else bias, out, m, n, ss_in, ss_in.shape[0],
        0.0 if norm is None else norm.eps, res, g, ss_out, kt, min(ring, kt) if ring else kt, bias is not None,
        norm is not None, tp, resid is not None, num_warps=4, launch_pdl=True,
    )  # fmt: skip
