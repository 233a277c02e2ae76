"""Does a decode projection gain from having its weights in shared memory before it waits for the kernel before?

The engine's Triton projections (`rollout.kernels.linear`) can only ask L2 for their weight slab before the
programmatic-dependent wait; the copy into shared memory, and x's, start after it. A Gluon kernel
(bench/gluon_kernels.py: TMA copies into shared memory tracked by mbarriers, warpgroup MMAs) can issue the weight's
copies before the wait, so after it only x (64 rows) has to arrive. A chain of --layers o-shaped projections
(64 x 896 @ 896 x 896, bf16, a weight of its own each), every one a programmatic dependent of the one before, is
timed as one CUDA graph: the engine's `linear`, the Gluon kernel with the weight requested after the wait, and
before it. The first projection of each is checked against torch.

    python bench/gluon_proj.py [--layers 24] [--reps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24, help="projections in the chain")
    p.add_argument("--reps", type=int, default=50, help="timed graph replays (median reported)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def chains(layers: int) -> tuple[dict, object, object]:
    """name -> (a chain of `layers` projections, each of the one before's output; the first one's output), the
    chain's input and first weight."""
    import gluon_kernels as GK
    import torch
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from rollout import kernels as K

    torch.manual_seed(0)
    m, n, bm, bn, bk = 64, 896, 64, 32, 128
    ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / n**0.5 for _ in range(layers)]
    xs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(layers + 1)]
    lay_x = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)
    lay_w = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
    x_descs = [TensorDescriptor.from_tensor(x, [bm, bk], lay_x) for x in xs]
    w_descs = [TensorDescriptor.from_tensor(w, [bn, bk], lay_w) for w in ws]
    outs = [xs[0]]

    def engine() -> None:  # `linear` allocates its output: the chain runs on what it returns
        del outs[1:]
        for w in ws:
            outs.append(K.linear(outs[-1], w))

    def gluon(early: bool):
        def chain() -> None:
            for i in range(layers):
                GK.proj[(triton.cdiv(n, bn),)](
                    x_descs[i], w_descs[i], xs[i + 1], n, triton.cdiv(n, bk), early, num_warps=4, launch_pdl=True
                )

        return chain, lambda: xs[1]

    return {"engine linear": (engine, lambda: outs[1]), "gluon, weight after the wait": gluon(False),
            "gluon, weight before the wait": gluon(True)}, xs[0], ws[0]  # fmt: skip


def time_chain(chain, first, x0, w0, layers: int, reps: int) -> tuple[float, float]:
    """µs per projection of the chain replayed as a graph, and the first projection's max error against torch."""
    import torch
    from boundary import median_us

    chain()
    torch.cuda.synchronize()
    err = (first().float() - x0.float() @ w0.float().T).abs().max().item()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    return median_us(graph.replay, reps) / layers, err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("gluon_proj: needs a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    runs, x0, w0 = chains(args.layers)
    rows = []
    for _round in range(2):
        for name, (chain, first) in runs.items():
            us, err = time_chain(chain, first, x0, w0, args.layers, args.reps)
            rows.append({"kernel": name, "us_per_projection": round(us, 3), "first_max_err": err})
            print(f"{name:32s} {us:7.3f} µs per projection  first projection max |err| {err:.3g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "layers": args.layers, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
