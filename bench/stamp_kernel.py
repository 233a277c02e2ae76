"""The stamp kernel of bench/timeline.py (its own module: Triton is imported only once a GPU run needs it)."""

import triton
import triton.language as tl


@triton.jit
def stamp(buf_ptr, idx, PDL: tl.constexpr):
    """Write the GPU's %globaltimer (ns) into buf[idx] once the previous kernel of the stream has finished. As a
    programmatic dependent it releases its successor first, so the next kernel launches as early as without it."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [idx], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(buf_ptr + idx, t)
