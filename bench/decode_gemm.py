"""Decode-step projections at few rows: cuBLAS (`F.linear`) vs the engine's Triton `rollout.kernels.linear`, and a
sweep of `linear`'s tilings (the source of `kernels.linear_config`).

For each decode projection (packed qkv, o, packed gate_up with SwiGLU in the epilogue, down, lm_head) of W (Qwen2 at
Qwen2.5-0.5B width/depth, vocab 49,152) and of a Qwen2.5-1.5B-shape model, at 64 rows, bf16: time cuBLAS and every
tiling (column tile x K block x pipeline stages x K slices; slices only for o and down, which add into the
residual stream: `kernels.linear_residual`, whose `rms_prep` adds the fp32 partials). Each timing replays one CUDA graph of calls over enough distinct weight copies (>= 256 MB) that no
weight is read from L2, launched as the engine launches them (programmatic dependent launch on Hopper: each call
prefetches its weights while the previous one runs); median of --reps replays, per call. GB/s = weight bytes /
time. Every candidate is first checked against fp32 `F.linear` (max |error|; above BAD_ERR it is reported, not
timed). cuBLAS's rows include the separate launch the engine would need after it (`finish`'s SwiGLU for gate_up,
`rms_prep`'s residual add for o and down).

    python bench/decode_gemm.py [--reps 20] [--models w,1.5b] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

L2_FLUSH_BYTES = 256 * 2**20
ROWS = 64
BAD_ERR = 0.1  # bf16 rounding of outputs ~N(0, 1) stays below ~0.03; a wrong kernel is off by O(1)
SWEEP = {"bn": (16, 32, 64), "bk": (128, 256), "stages": (3, 4), "splits": (1, 2, 4, 8)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20, help="graph replays per timing (median reported)")
    p.add_argument("--models", default="w,1.5b", help="comma-separated, of w, 1.5b")
    p.add_argument("--json", help="write every figure here")
    return p.parse_args()


def cases(models: list[str]) -> list[dict]:
    """Every timed projection: out = x [ROWS, K] @ W [N, K]^T, q/k/v and gate/up packed as the engine packs them."""
    from bench.w2 import SHAPES

    out = []
    for label in models:
        c = SHAPES[label]
        h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        d = h // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        for proj, n, k, bias, glu, residual, per_step in (
            ("qkv", q + 2 * kv, h, True, False, False, layers),
            ("o", h, q, False, False, True, layers),
            ("gate_up", 2 * i, h, False, True, False, layers),
            ("down", h, i, False, False, True, layers),
            ("lm_head", c["vocab_size"], h, False, False, False, 1),
        ):
            out.append(dict(model=label, proj=proj, n=n, k=k, bias=bias, glu=glu, residual=residual, per_step=per_step))
    return out


def tilings(k: int, residual: bool):
    """K slices only where the projection adds into the residual stream, and no slice shorter than 512."""
    from rollout.kernels import LinearConfig

    for bn, bk, stages, splits in itertools.product(*SWEEP.values()):
        if splits == 1 or (residual and k // splits >= 512):
            yield LinearConfig(bn, bk, splits, stages, 4)


def graph_time(calls, reps: int) -> float:
    """Seconds per call: median over `reps` replays of one CUDA graph holding all `calls`."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # compiles Triton kernels, warms cuBLAS
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def reference(x, w, b, glu: bool):
    """The projection in fp32 (SwiGLU'd for glu): what every candidate is checked against."""
    import torch.nn.functional as F

    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    if glu:
        gate, up = want.chunk(2, -1)
        want = F.silu(gate) * up
    return want


def time_case(case: dict, reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from rollout import kernels

    n, k, glu = case["n"], case["k"], case["glu"]
    copies = max(4, -(-L2_FLUSH_BYTES // (n * k * 2)))
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5 for _ in range(copies)]
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if case["bias"] else None
    x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = reference(x, ws[0], b, glu)

    resid, g = torch.zeros(ROWS, n, device="cuda", dtype=torch.bfloat16), torch.ones(n, device="cuda")

    def cublas(w):
        out = F.linear(x, w, b)
        if case["residual"]:
            return kernels.rms_prep(resid, out, g, 1e-6).xg
        return kernels.finish(out, glu=True) if glu else out

    def ours(w):
        if case["residual"]:
            return kernels.linear_residual(x, w, b, resid, g, 1e-6).xg
        return kernels.linear(x, w, b, glu=glu)

    results = []
    default = kernels.linear_config
    for cfg in [None, *tilings(k, case["residual"])]:
        if cfg is not None:
            kernels.linear_config = lambda *a, cfg=cfg: cfg
        fn = cublas if cfg is None else ours
        try:  # compiles the variant; a tiling that does not build (shared memory) is reported, not fatal
            resid.zero_()  # the residual stream then ends as the projection itself (xg = resid * 1)
            err = (fn(ws[0]).float() - want).abs().max().item()
            if err > BAD_ERR:
                print(f"WRONG {cfg} for {case}: max |err| {err:.3f}", flush=True)
                continue
            t = graph_time([lambda w=w, fn=fn: fn(w) for w in ws], reps)
        except Exception as exc:  # noqa: BLE001
            print(f"skipped {cfg} for {case['model']} {case['proj']}: {str(exc).splitlines()[0][:100]}", flush=True)
            continue
        finally:
            kernels.linear_config = default
        results.append({"config": None if cfg is None else list(cfg), "us": t * 1e6, "gbs": n * k * 2 / t / 1e9,
                        "max_err": err})  # fmt: skip
    chosen = default(n // 2 if glu else n, k, glu, case["residual"])
    results.append(
        {
            "config": "chosen",
            "chosen": list(chosen),
            **next(({k: v for k, v in r.items() if k != "config"} for r in results if r["config"] == list(chosen)), {}),
        }
    )
    del ws
    torch.cuda.empty_cache()
    return results


def table(rows: list[dict]) -> str:
    lines = [f"{'model':5s} {'proj':8s} {'N':>6s} {'K':>5s} | {'cuBLAS us':>9s} {'GB/s':>5s} | {'chosen us':>9s} "
             f"{'GB/s':>5s} | {'best us':>7s} {'GB/s':>5s} {'best tiling (bn, bk, splits, stages, warps)':44s}"]  # fmt: skip
    per_step: dict = {}
    for r in rows:
        res = r["results"]
        cub = res[0]
        best = min(res[1:-1], key=lambda x: x["us"])
        ch = res[-1]
        lines.append(f"{r['model']:5s} {r['proj']:8s} {r['n']:6d} {r['k']:5d} | {cub['us']:9.1f} {cub['gbs']:5.0f} | "
                     f"{ch.get('us', float('nan')):9.1f} {ch.get('gbs', float('nan')):5.0f} | {best['us']:7.1f} "
                     f"{best['gbs']:5.0f} {str(best['config']):44s}")  # fmt: skip
        t = per_step.setdefault(r["model"], [0.0, 0.0, 0.0])
        for j, v in enumerate((cub["us"], ch.get("us", float("nan")), best["us"])):
            t[j] += r["per_step"] * v
    for model, (c, ch, b) in per_step.items():
        lines.append(f"{model}: projections per decode step {c / 1e3:.3f} ms cuBLAS, {ch / 1e3:.3f} chosen, "
                     f"{b / 1e3:.3f} best")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    import torch
    import triton
    from tqdm import tqdm

    t0 = time.perf_counter()
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for case in tqdm(cases(args.models.split(",")), desc="projections"):
        rows.append({**case, "results": time_case(case, args.reps)})
        print(table(rows[-1:]).splitlines()[1], flush=True)
    res["rows"] = rows
    print(f"GPU: {res['gpu']}  torch {res['torch']}  triton {res['triton']}  (bf16, {ROWS} rows, CUDA-graph replays)")
    print(table(rows))
    res["wall_s"] = time.perf_counter() - t0
    print(f"wall {res['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
