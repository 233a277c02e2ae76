"""The decode attention alone, as a function of the cached slots: W's shape (64 rows, 14 query heads, 2 KV heads,
head dim 64), 24 `rope_attention` launches chained by programmatic dependent launch in one CUDA graph, one cache for
all of them (L2-resident, as the engine's rms_prep leaves each layer's), per kernels.py version; microseconds per
launch, best of 5 x 20 replays. The slope between slot counts is what each 64-slot block of cache costs a row's
program; W's rollout reads 33-288 slots per row, W2's tail up to ~1,000. Each version's output at the middle slot
count is compared with the first version's (bf16, so a changed kernel may differ in the last bits).

    python3 bench/attn_chain.py [--ref .carry/kernels_ref.py ...] [--slots 64,160,288,544] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (the benches' shared option parsing)

ROWS, HEADS, KV, D, T, LAYERS = 64, 14, 2, 64, 1024, 24


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", action="append", default=[], help="another kernels.py to time (repeatable)")
    p.add_argument("--slots", default="64,160,288,544", help=f"cached slot counts, comma-separated (< {T})")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    args.slots = G.int_list(p, "--slots", args.slots)
    if not all(0 < s < T for s in args.slots):
        p.error(f"--slots: each count must be in 1..{T - 1}")
    for path in args.ref:
        if not Path(path).is_file():
            p.error(f"--ref: no file {path}")
    return args


def inputs():
    """qkv [ROWS, (HEADS + 2 KV) D], caches [ROWS, KV, T, D], rotation tables, no padding; fixed seed."""
    import torch

    gen = torch.Generator("cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(ROWS, (HEADS + 2 * KV) * D, generator=gen, **bf)
    kc, vc = (torch.randn(ROWS, KV, T, D, generator=gen, **bf) for _ in range(2))
    cos, sin = (torch.randn(T, D // 2, generator=gen, **bf) for _ in range(2))
    return qkv, kc, vc, cos, sin, torch.zeros(ROWS, dtype=torch.long, device="cuda")


def per_launch_us(attend) -> float:
    """`attend()` LAYERS times in one CUDA graph (captured on a side stream after two warm-up calls): best of 5
    rounds of 20 replays, microseconds per launch."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            attend()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(LAYERS):
                attend()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / 20 / LAYERS)
    return best


def sweep(slots: list[int], data) -> tuple[dict, object]:
    """µs per launch at each slot count with the `rollout.kernels` now loaded, and its output at the middle count."""
    import torch

    import rollout.kernels as K

    qkv, kc, vc, cos, sin, pad = data
    row, mid = {}, None
    for n in slots:
        ctr = torch.tensor([n, 0], device="cuda")

        def attend(ctr=ctr):
            return K.rope_attention(qkv, kc, vc, cos, sin, ctr, pad, HEADS)

        if n == slots[len(slots) // 2]:
            mid = attend().float()
        row[n] = per_launch_us(attend)
    return row, mid


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("attn_chain: needs a CUDA GPU")
    from ab_kernels import kernels_from

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    data = inputs()
    res, first = {}, None
    for name in [None, *args.ref]:
        with kernels_from(name):
            row, mid = sweep(args.slots, data)
        first = mid if first is None else first
        key = name or "working tree"
        res[key] = {"us_per_launch": row, "max_diff_vs_first": (mid - first).abs().max().item()}
        slope = (row[args.slots[-1]] - row[args.slots[0]]) / max(1, args.slots[-1] - args.slots[0]) * 64
        cells = "  ".join(f"{n}: {us:6.3f}" for n, us in row.items())
        print(f"{key:32} {cells}  | {slope:.3f} us per 64 slots | max diff {res[key]['max_diff_vs_first']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
