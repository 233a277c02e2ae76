"""Decode-step projections at few rows: cuBLAS (`F.linear`, what the engine runs) vs torch split-K vs a Triton split-K
GEMM. The question: does splitting K give the small-N projections more CTAs and so more weight bandwidth? (Measured
on an H100: no, see bench/RESULTS.md; the candidates live here, not in the engine.)

For each decode projection (packed qkv, o, packed gate_up, down, lm_head) of
- W (Qwen2 at Qwen2.5-0.5B width/depth, vocab 49,152) at 64 rows, and
- the learning-run model (SmolLM2-135M: hidden 576, intermediate 1536, 9/3 heads, vocab 49,152) at 512 rows,
time in bf16: `F.linear`; `splitk_matmul` (one bmm over s K slices viewed in place, then a sum; s = 2..16); and
`skinny_linear` (Triton: N tile x K slice x M tile grid, fp32 partials reduced in a fixed order; split x N tile x
K block sweep). Each timing replays a CUDA graph (as the engine does) of calls on enough distinct weight copies
(>= 256 MB) that no weight is read from L2; median of --reps replays. GB/s = weight bytes / time. Every candidate
is first checked against fp32 `F.linear` (max |error| printed; above BAD_ERR it is reported and not timed).

    python bench/decode_gemm.py [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOL135 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152)  # fmt: skip
L2_FLUSH_BYTES = 256 * 2**20
SPLITS = (1, 2, 4, 8, 16)
BLOCK_N = (16, 32, 64)
BLOCK_K = (64, 128)
BAD_ERR = 0.1  # bf16 rounding of outputs ~N(0, 1) stays below ~0.03; a wrong kernel is off by O(1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20, help="graph replays per timing (median reported)")
    p.add_argument("--json", help="write every figure here")
    return p.parse_args()


class Choice(NamedTuple):
    """cuBLAS, torch split-K over `split` K slices, or the Triton kernel (`split` slices, block_m x block_n tiles,
    block_k columns per iteration)."""

    kind: str = "cublas"
    split: int = 1
    block_m: int = 64
    block_n: int = 32
    block_k: int = 128

    def __str__(self) -> str:
        if self.kind == "triton":
            return f"s={self.split} {self.block_m}x{self.block_n}x{self.block_k}"
        return self.kind if self.kind == "cublas" else f"s={self.split}"


def cases() -> list[tuple[str, int, str, int, int, bool, int]]:
    """(model, rows, projection, N, K, has bias, times per decode step) for every timed shape: out = x [rows, K] @
    W [N, K]^T, q/k/v and gate/up packed as the engine packs them; Qwen2 has q/k/v biases."""
    from bench.grpo_step import QWEN05_SHAPE

    out = []
    for label, rows, c, qkv_bias in (("W", 64, QWEN05_SHAPE, True), ("135M", 512, SMOL135, False)):
        h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        d = h // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        out += [
            (label, rows, "qkv", q + 2 * kv, h, qkv_bias, layers),
            (label, rows, "o", h, q, False, layers),
            (label, rows, "gate_up", 2 * i, h, False, layers),
            (label, rows, "down", h, i, False, layers),
            (label, rows, "lm_head", c["vocab_size"], h, False, 1),
        ]
    return out


def splitk_matmul(x, weight, split: int, bias=None):
    """F.linear(x, weight, bias) as one batched GEMM over `split` K slices, summed: `split`x more CTAs for a skinny x.
    x [M, K], weight [N, K], K % split == 0; the slices are strided views of the weight, not copies."""
    import torch

    m, k = x.shape
    n = weight.shape[0]
    ks = k // split
    part = torch.bmm(x.view(m, split, ks).transpose(0, 1), weight.view(n, split, ks).permute(1, 2, 0))
    out = part.sum(0)
    return out if bias is None else out + bias


@functools.cache
def _triton_kernels():
    """The split-K GEMM and its reduce, compiled on first use (Triton is imported only on a GPU run)."""
    global tl  # the kernel bodies below read `tl` as a module global, as Triton requires
    import triton
    import triton.language as tl

    @triton.jit
    def gemm(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, k_per, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # One (N tile, K slice, M tile): fp32 partial sums to out[slice] ([S, M, N]); DIRECT (one slice): bias
        # added and the model dtype stored in place.
        pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, k_per, BLOCK_K):  # k_per is a multiple of BLOCK_K: slices never overlap
            kk = pid_s * k_per + k + rk
            a = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc = tl.dot(a, b, acc)
        msk = (rm[:, None] < M) & (rn[None, :] < N)
        if DIRECT:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=msk)
        else:
            tl.store(out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=msk)

    @triton.jit
    def splitk_reduce(part_ptr, b_ptr, out_ptr, MN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < MN
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(S):  # slices summed in a fixed order: deterministic, no atomics
            acc += tl.load(part_ptr + s * MN + offs, mask=m, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)

    return gemm, splitk_reduce


def skinny_linear(x, weight, bias, split: int, block_m: int, block_n: int, block_k: int):
    """F.linear(x, weight, bias) (x [M, K], weight [N, K], contiguous, bf16) as the Triton split-K GEMM; split=1:
    one launch, else a second launch reduces the fp32 partial sums."""
    import torch
    import triton

    gemm, splitk_reduce = _triton_kernels()
    m, k = x.shape
    n = weight.shape[0]
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole K blocks per slice
    s = triton.cdiv(k, k_per)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n), s, triton.cdiv(m, block_m))
    b = weight if bias is None else bias
    if s == 1:
        gemm[grid](x, weight, b, out, m, n, k, k_per, bias is not None, True, block_m, block_n, block_k)
        return out
    part = torch.empty((s, m, n), device=x.device, dtype=torch.float32)
    gemm[grid](x, weight, b, part, m, n, k, k_per, False, False, block_m, block_n, block_k)
    splitk_reduce[(triton.cdiv(m * n, 1024),)](part, b, out, m * n, n, s, bias is not None, 1024)
    return out


def linear(x, weight, bias, c: Choice):
    import torch

    if c.kind == "splitk":
        return splitk_matmul(x, weight, c.split, bias)
    if c.kind == "triton":
        return skinny_linear(x, weight, bias, *c[1:])
    return torch.nn.functional.linear(x, weight, bias)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def candidates(rows: int, k: int):
    """Every Choice tried for one shape (Triton configs that launch the same slices counted once)."""
    yield Choice()
    for s in SPLITS[1:]:
        if k % s == 0 and k // s >= 32:
            yield Choice("splitk", s)
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
    seen = set()
    for bn in BLOCK_N:
        for bk in BLOCK_K:
            for s in SPLITS:
                eff = _cdiv(k, _cdiv(_cdiv(k, s), bk) * bk)  # slices actually launched
                if k // s >= bk and (bn, bk, eff) not in seen:
                    seen.add((bn, bk, eff))
                    yield Choice("triton", s, block_m, bn, bk)


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


def time_shape(rows: int, n: int, k: int, bias: bool, reps: int) -> list[dict]:
    import torch

    copies = max(4, _cdiv(L2_FLUSH_BYTES, n * k * 2))
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5 for _ in range(copies)]
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if bias else None
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = torch.nn.functional.linear(x.float(), ws[0].float(), None if b is None else b.float())
    out = []
    for c in candidates(rows, k):
        try:  # compiles the Triton variant; a config that does not build is reported, not fatal
            err = (linear(x, ws[0], b, c).float() - want).abs().max().item()
        except Exception as exc:  # noqa: BLE001
            print(f"skipped {c.kind} {c} at {rows}x{n}x{k}: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        if err > BAD_ERR:
            print(f"WRONG {c.kind} {c} at {rows}x{n}x{k}: max |err| {err:.3f} vs fp32 F.linear", flush=True)
            continue
        t = graph_time([lambda w=w, c=c: linear(x, w, b, c) for w in ws], reps)
        out.append({"choice": c, "us": t * 1e6, "gbs": n * k * 2 / t / 1e9, "max_err": err})
    del ws
    torch.cuda.empty_cache()
    return out


def micro(reps: int) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for label, m, proj, n, k, bias, per_step in tqdm(cases(), desc="shapes"):
        res = time_shape(m, n, k, bias, reps)
        best = {kind: min((r for r in res if r["choice"].kind == kind), key=lambda r: r["us"], default=None)
                for kind in ("cublas", "splitk", "triton")}  # fmt: skip
        err = {kind: max((r["max_err"] for r in res if r["choice"].kind == kind), default=None) for kind in best}
        winner = min((r for r in best.values() if r), key=lambda r: r["us"])
        rows.append(dict(model=label, rows=m, proj=proj, n=n, k=k, per_step=per_step, best=best, err=err,
                         winner=winner, all=res))  # fmt: skip
    return rows


def _cell(r: dict | None, extra: str) -> str:
    return f"{r['us']:9.1f} {r['gbs']:5.0f} {extra}" if r else f"{'-':>9s} {'':5s} {extra}"


def micro_table(rows: list[dict]) -> str:
    head = f"{'model':5s} {'rows':>4s} {'proj':8s} {'N':>6s} {'K':>5s} | {'cuBLAS us':>9s} {'GB/s':>5s} | "
    head += f"{'splitk us':>9s} {'GB/s':>5s} {'s':>3s} | {'triton us':>9s} {'GB/s':>5s} {'config':18s} | x    | "
    head += "max |err| cublas/splitk/triton"
    lines, per_step = [head], {}
    for r in rows:
        b, e = r["best"], r["err"]
        sk, tr = b["splitk"], b["triton"]
        errs = "/".join("-" if v is None else f"{v:.3f}" for v in e.values())
        sk_split = f"{sk['choice'].split:3d}" if sk else "   "
        tr_config = f"{str(tr['choice']) if tr else '':18s}"
        lines.append(
            f"{r['model']:5s} {r['rows']:4d} {r['proj']:8s} {r['n']:6d} {r['k']:5d} | {_cell(b['cublas'], '')}| "
            f"{_cell(sk, sk_split)} | {_cell(tr, tr_config)} | {b['cublas']['us'] / r['winner']['us']:.2f} | {errs}"
        )
        times = per_step.setdefault((r["model"], r["rows"]), [0.0, 0.0])
        times[0] += r["per_step"] * b["cublas"]["us"]
        times[1] += r["per_step"] * r["winner"]["us"]
    for (model, m), (old, new) in per_step.items():
        lines.append(f"{model} at {m} rows: decode GEMMs per step {old / 1e3:.3f} ms cuBLAS -> {new / 1e3:.3f} ms best")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    import torch
    import triton

    t0 = time.perf_counter()
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = micro(args.reps)
    res["micro"] = [
        {**{k: v for k, v in r.items() if k not in ("best", "all", "winner")}, "winner": f"{r['winner']['choice']!r}",
         "all": [{**x, "choice": list(x["choice"])} for x in r["all"]]}
        for r in rows
    ]  # fmt: skip
    print(f"GPU: {res['gpu']}  torch {res['torch']}  triton {res['triton']}  (bf16, CUDA-graph replays)")
    print(micro_table(rows))
    res["wall_s"] = time.perf_counter() - t0
    print(f"wall {res['wall_s']:.0f} s")
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
