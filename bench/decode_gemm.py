"""Decode-step projections at few rows: cuBLAS vs torch split-K vs the Triton split-K kernel, then a W rollout per mode.

1. Micro-benchmark: for each decode projection (packed qkv, o, packed gate_up, down, lm_head) of
   - W (Qwen2 at Qwen2.5-0.5B width/depth, vocab 49,152) at 64 rows, and
   - the learning-run model (SmolLM2-135M: hidden 576, intermediate 1536, 9/3 heads, vocab 49,152) at 512 rows,
   time `F.linear` (cuBLAS), `splitk_matmul` (torch bmm over s K slices, s = 2..16) and `kernels.skinny_linear`
   (Triton: split x N tile x K block sweep) in bf16. Each timing replays a CUDA graph (as the engine does) of calls
   on enough distinct weight copies (>= 256 MB) that no weight is read from L2; median of --reps replays / calls.
   GB/s = weight bytes / time. The winners are printed as DECODE_GEMM_TABLE entries (rollout/model.py).
2. Rollout: one W rollout (64 x 256 new tokens, bench/grpo_step.py's helpers) through the engine with
   decode_gemm = cublas (the current path), splitk, triton (heuristic picks) and tuned (this run's winners).

    python bench/decode_gemm.py [--json out.json] [--skip-rollout] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOL135 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
)  # fmt: skip
TOKENIZERS = ("models/smollm2-135m-instruct", ".carry/tok")
L2_FLUSH_BYTES = 256 * 2**20
SPLITS = (1, 2, 4, 8, 16)
BLOCK_N = (16, 32, 64)
BLOCK_K = (64, 128)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20, help="graph replays per timing (median reported)")
    p.add_argument("--steps", type=int, default=3, help="timed W rollouts per engine mode (median reported)")
    p.add_argument("--modes", default="cublas,splitk,triton,tuned", help="engine decode_gemm modes to time")
    p.add_argument("--skip-rollout", action="store_true", help="only the micro-benchmark")
    p.add_argument(
        "--tokenizer", help="a 49,152-token tokenizer folder (default: the first of " + ", ".join(TOKENIZERS) + ")"
    )
    p.add_argument("--workdir", default="/tmp/rldock_w", help="where the random W model folder is written")
    p.add_argument("--json", help="write every figure here")
    return p.parse_args()


def cases() -> list[tuple[str, int, str, int, int, bool]]:
    """(model, rows, projection, N, K, has bias) for every timed shape."""
    from bench.grpo_step import QWEN05_SHAPE
    from rollout.model import ModelConfig, decode_shapes

    out = []
    for label, rows, cfg in (
        ("W", 64, ModelConfig.from_hf({"model_type": "qwen2", **QWEN05_SHAPE})),
        ("135M", 512, ModelConfig.from_hf(SMOL135)),
    ):
        for proj, (n, k) in decode_shapes(cfg).items():
            bias = (proj == "qkv" and cfg.qkv_bias) or (proj in ("gate_up", "down") and cfg.mlp_bias)
            out.append((label, rows, proj, n, k, bias))
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def candidates(rows: int, n: int, k: int):
    """Every GemmChoice tried for one shape."""
    from rollout.model import GemmChoice

    yield GemmChoice()
    for s in SPLITS[1:]:
        if k % s == 0 and k // s >= 32:
            yield GemmChoice("splitk", s)
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
    seen = set()
    for bn in BLOCK_N:
        for bk in BLOCK_K:
            for s in SPLITS:
                k_per = _cdiv(_cdiv(k, s), bk) * bk
                eff = _cdiv(k, k_per)  # slices actually launched (whole K blocks per slice)
                if k // s >= bk and (bn, bk, eff) not in seen:
                    seen.add((bn, bk, eff))
                    yield GemmChoice("triton", s, block_m, bn, bk)


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

    from rollout.model import decode_linear

    copies = max(4, _cdiv(L2_FLUSH_BYTES, n * k * 2))
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5 for _ in range(copies)]
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if bias else None
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = torch.nn.functional.linear(x.float(), ws[0].float(), None if b is None else b.float())
    out = []
    for choice in candidates(rows, n, k):
        try:  # compiles the Triton variant; a config that does not build is reported, not fatal
            err = (decode_linear(x, ws[0], b, choice).float() - want).abs().max().item()
        except Exception as exc:  # noqa: BLE001
            print(f"skipped {choice} at {rows}x{n}x{k}: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        calls = [lambda w=w, c=choice: decode_linear(x, w, b, c) for w in ws]
        t = graph_time(calls, reps)
        out.append({"choice": choice, "us": t * 1e6, "gbs": n * k * 2 / t / 1e9, "max_err": err})
    del ws
    torch.cuda.empty_cache()
    return out


def micro(reps: int) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for label, m, proj, n, k, bias in tqdm(cases(), desc="shapes"):
        res = time_shape(m, n, k, bias, reps)
        best = {kind: min((r for r in res if r["choice"].kind == kind), key=lambda r: r["us"], default=None)
                for kind in ("cublas", "splitk", "triton")}  # fmt: skip
        rows.append(dict(model=label, rows=m, proj=proj, n=n, k=k, best=best, all=res,
                         winner=min((r for r in best.values() if r), key=lambda r: r["us"])))  # fmt: skip
    return rows


def micro_table(rows: list[dict]) -> str:
    layers = {"W": 24, "135M": 30}
    head = f"{'model':5s} {'rows':>4s} {'proj':8s} {'N':>6s} {'K':>5s} | {'cuBLAS us':>9s} {'GB/s':>5s} | "
    head += f"{'splitk us':>9s} {'GB/s':>5s} {'s':>3s} | {'triton us':>9s} {'GB/s':>5s} {'config':28s} | x"
    lines, per_step = [head], {}
    for r in rows:
        b = r["best"]
        sk, tr = b["splitk"], b["triton"]
        sk_txt = f"{sk['us']:9.1f} {sk['gbs']:5.0f} {sk['choice'].split:3d}" if sk else f"{'-':>9s} {'':5s} {'':3s}"
        lines.append(
            f"{r['model']:5s} {r['rows']:4d} {r['proj']:8s} {r['n']:6d} {r['k']:5d} | {b['cublas']['us']:9.1f} "
            f"{b['cublas']['gbs']:5.0f} | {sk_txt} | {tr['us']:9.1f} {tr['gbs']:5.0f} {str(tr['choice']):28s} | "
            f"{b['cublas']['us'] / r['winner']['us']:.2f}  (max err {r['winner']['max_err']:.3f})"
        )
        times = per_step.setdefault((r["model"], r["rows"]), [0.0, 0.0])
        mult = 1 if r["proj"] == "lm_head" else layers[r["model"]]
        times[0] += mult * b["cublas"]["us"]
        times[1] += mult * r["winner"]["us"]
    for (model, m), (old, new) in per_step.items():
        lines.append(f"{model} at {m} rows: decode GEMMs per step {old / 1e3:.3f} ms cuBLAS -> {new / 1e3:.3f} ms best")
    return "\n".join(lines)


def table_snippet(rows: list[dict]) -> str:
    """The winners as DECODE_GEMM_TABLE entries (cuBLAS winners are left out: that is the table's fallback)."""
    lines = ["DECODE_GEMM_TABLE.update({"]
    for r in rows:
        c = r["winner"]["choice"]
        if c.kind != "cublas":
            lines.append(f"    ({r['rows']}, {r['n']}, {r['k']}): {c!r},  # {r['model']} {r['proj']}")
    return "\n".join(lines + ["})"])


def rollouts(args, rows: list[dict]) -> dict:
    """One W rollout through the engine per decode_gemm mode ("tuned" = this run's W winners)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.grpo_step import bench_engine, make_model_folder, w_items
    from rollout import model as M

    for r in rows:
        if r["model"] == "W" and r["winner"]["choice"].kind != "cublas":
            M.DECODE_GEMM_TABLE[(r["rows"], r["n"], r["k"])] = r["winner"]["choice"]
    tokenizer = args.tokenizer or next((t for t in TOKENIZERS if (ROOT / t).is_dir()), TOKENIZERS[0])
    path, tok, _ = make_model_folder(SimpleNamespace(workdir=args.workdir, tokenizer=str(ROOT / tokenizer)))
    items = w_items(tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    out = {}
    for mode in args.modes.split(","):
        out[mode] = bench_engine(model, items, tok.eos_token_id, args.steps, 1, decode_gemm=mode)
        print(f"rollout decode_gemm={mode}: {out[mode]['time_s']:.4f} s", flush=True)
    return out


def main() -> None:
    args = parse_args()
    import torch

    t0 = time.perf_counter()
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    rows = micro(args.reps)
    res["micro"] = [
        {**{k: v for k, v in r.items() if k not in ("best", "all", "winner")}, "winner": str(r["winner"]["choice"]),
         "all": [{**x, "choice": list(x["choice"])} for x in r["all"]]}
        for r in rows
    ]  # fmt: skip
    print(f"GPU: {res['gpu']}  torch {res['torch']}  triton {res['triton']}  (bf16, CUDA-graph replays)")
    print(micro_table(rows))
    print(table_snippet(rows))
    if not args.skip_rollout:
        res["rollout"] = rollouts(args, rows)
        base = res["rollout"].get("cublas")
        for mode, r in res["rollout"].items():
            note = f"  x{base['time_s'] / r['time_s']:.2f} vs cublas" if base else ""
            print(f"W rollout decode_gemm={mode:7s} {r['time_s']:.4f} s  {r['tok_s']:8.0f} tok/s{note}")
    res["wall_s"] = time.perf_counter() - t0
    print(f"wall {res['wall_s']:.0f} s")
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
