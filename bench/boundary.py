"""What a hand-over between dependent stages costs on the GPU: a kernel boundary (programmatic dependent launch, or
plain stream order) against a grid-wide barrier inside one persistent kernel.

Each stage has every program read a value another program wrote in the stage before and write its own, so a stage
cannot start before the last one is visible. N stages are timed as one CUDA graph (chains) or one launch
(persistent) and the result is checked (every value must equal N). Decides whether a persistent decode kernel can
win on hand-overs alone: its layers would pay one barrier where the launched chain pays one boundary.

    python3 bench/boundary.py --json $OUT/boundary.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl


@triton.jit
def _stage(src, dst, G, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    p = tl.program_id(0)
    tl.store(dst + p, tl.load(src + (p + 1) % G) + 1)


@triton.jit
def _grid_sync(bar_ptr, target):
    """Arrive at the barrier (release: this program's stores are visible first), then spin until `target` programs
    have arrived (acquire)."""
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _persistent(buf, bar_ptr, G, N):
    p = tl.program_id(0)
    for s in range(N):
        src = buf + (s % 2) * G
        dst = buf + ((s + 1) % 2) * G
        tl.store(dst + p, tl.load(src + (p + 1) % G, cache_modifier=".cg") + 1)
        _grid_sync(bar_ptr, (s + 1) * G)


def median_us(fn, reps: int) -> float:
    """Median µs of `fn()` (a GPU launch or graph replay) over `reps` timed calls after one untimed."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def chain(grid: int, stages: int, pdl: bool, reps: int) -> tuple[float, bool]:
    """µs per stage of `stages` launches in one graph, and whether the result is right."""
    bufs = [torch.zeros(grid, device="cuda", dtype=torch.int32) for _ in range(2)]

    def run():
        for s in range(stages):
            _stage[(grid,)](bufs[s % 2], bufs[(s + 1) % 2], grid, pdl, launch_pdl=pdl)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bufs[0].zero_()
        run()
    t = median_us(graph.replay, reps)
    return t / stages, bool((bufs[stages % 2] == stages).all())


def persistent(grid: int, stages: int, reps: int) -> tuple[float, bool]:
    buf = torch.zeros(2 * grid, device="cuda", dtype=torch.int32)
    bar = torch.zeros(1, device="cuda", dtype=torch.int32)

    def run():
        buf.zero_()
        bar.zero_()
        _persistent[(grid,)](buf, bar, grid, stages)

    t = median_us(run, reps)
    return t / stages, bool((buf[(stages % 2) * grid : (stages % 2 + 1) * grid] == stages).all())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=144, help="hand-overs per timed run (W: 144 kernels per step)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("boundary: needs a CUDA GPU")
        return 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for grid in (36, 128, sms):
        for name, us, ok in (
            ("launch chain", *chain(grid, args.stages, False, args.reps)),
            ("PDL chain", *chain(grid, args.stages, True, args.reps)),
            ("persistent + grid barrier", *persistent(grid, args.stages, args.reps)),
        ):
            rows.append({"grid": grid, "kind": name, "us_per_stage": round(us, 3), "correct": ok})
            print(f"grid {grid:4d}  {name:28s} {us:7.3f} µs per stage  {'ok' if ok else 'WRONG'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "stages": args.stages, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
