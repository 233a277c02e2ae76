"""The Gluon projection of bench/gluon_proj.py (its own module: Gluon is imported only once a GPU run needs it)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _griddep(WAIT: gl.constexpr):
    """Programmatic dependent launch: wait for the previous kernel's writes, or let the next kernel launch."""
    if WAIT:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    else:
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )


@gluon.jit
def proj(x_desc, w_desc, out_ptr, N, KT: gl.constexpr, W_EARLY: gl.constexpr, num_warps: gl.constexpr):
    """out[:, n0:n0+BN] = x @ W[n0:n0+BN].T for one program's BN columns, K in KT tiles of BK, everything held in
    shared memory at once (no buffer is reused). W_EARLY: the weight's tiles are requested before the wait for the
    previous kernel (they arrive while it runs), else after it, with x's."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    n0 = gl.program_id(0) * BN
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [KT, BN, BK], w_desc.layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [KT, BM, BK], x_desc.layout)
    w_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    x_bar = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
    mbarrier.init(w_bar, count=1)
    for i in gl.static_range(KT):
        mbarrier.init(x_bar.index(i), count=1)
    if W_EARLY:
        mbarrier.expect(w_bar, KT * w_desc.block_type.nbytes)
        for i in gl.static_range(KT):
            tma.async_copy_global_to_shared(w_desc, [n0, i * BK], w_bar, w_smem.index(i))
    _griddep(True)
    _griddep(False)
    if not W_EARLY:
        mbarrier.expect(w_bar, KT * w_desc.block_type.nbytes)
        for i in gl.static_range(KT):
            tma.async_copy_global_to_shared(w_desc, [n0, i * BK], w_bar, w_smem.index(i))
    for i in gl.static_range(KT):
        mbarrier.expect(x_bar.index(i), x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [0, i * BK], x_bar.index(i), x_smem.index(i))
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BN, 16])  # fmt: skip
    acc = gl.zeros([BM, BN], gl.float32, layout=layout)
    mbarrier.wait(w_bar, phase=0)
    for i in gl.static_range(KT):
        mbarrier.wait(x_bar.index(i), phase=0)
        acc = warpgroup_mma(x_smem.index(i), w_smem.index(i).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    rm = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    gl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(gl.bfloat16), mask=rn[None, :] < N)
