"""One decoder layer's decode kernels under Nsight Compute: each kernel alone (ncu serializes them, so no
programmatic-dependent overlap), with its time, DRAM and L2 bytes, L2 hit rate and the warps' top stall reasons,
late in W's rollout (bench/grpo_step.py: 64 rows x 256 new tokens), where the KV cache is long.

Run it under ncu (the profiler starts at a later generate call, so warm-up and compilation are not profiled), then
summarize the CSV:

    ncu --profile-from-start off --cache-control none --clock-control none \\
        -k regex:"_linear_kernel|_rope_attention_kernel|_rms_prep_kernel" --launch-skip 21000 --launch-count 12 \\
        --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,\\
    lts__t_sector_hit_rate.pct,launch__grid_size,launch__shared_mem_per_block,launch__registers_per_thread,\\
    regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \\
        python bench/ncu_layer.py --tokenizer DIR > ncu.csv
    python bench/ncu_layer.py --summary ncu.csv
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and parser)

STALL = "smsp__average_warps_issue_stalled_"


def parse_args():
    p = G.gpu_bench_parser(__doc__, "profiled call")
    next(a for a in p._actions if a.dest == "steps").help = "warm-up rollouts before the profiled one"
    p.add_argument("--summary", metavar="CSV", help="print the table of an ncu --csv --page raw file and exit")
    return p.parse_args()


def summarize(path: str, json_path: str | None) -> None:
    """One line per profiled kernel from ncu's raw CSV: time, bytes, grid, and the five largest stall reasons;
    every metric of every kernel to json_path."""
    rows = list(csv.reader(Path(path).read_text().splitlines()))
    start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if start is None:
        sys.exit(f"ncu_layer: {path} holds no ncu --csv --page raw table")
    col = {h: i for i, h in enumerate(rows[start])}
    kernels = [r for r in rows[start + 2 :] if len(r) >= len(col)]
    if json_path:
        Path(json_path).write_text(json.dumps([dict(zip(rows[start], r, strict=False)) for r in kernels], indent=1))
    for r in kernels:
        stalls = sorted(
            ((float(r[i].replace(",", "") or 0), h[len(STALL) :].split("_per_issue")[0]) for h, i in col.items()
             if h.startswith(STALL)),
            reverse=True,
        )[:5]  # fmt: skip

        def get(name: str, r=r) -> str:
            return r[col[name]] if name in col else "-"

        print(
            f"{get('Kernel Name')[:24]:24} {get('gpu__time_duration.sum'):>8} ns  grid {get('launch__grid_size'):>4}"
            f"  DRAM {get('dram__bytes_read.sum'):>12} B  L2 {get('lts__t_bytes.sum'):>12} B"
            f"  hit {get('lts__t_sector_hit_rate.pct'):>6} %  stalls: " + ", ".join(f"{n} {v:.2f}" for v, n in stalls)
        )


def main() -> None:
    args = parse_args()
    if args.summary:
        summarize(args.summary, args.json)
        return
    import torch

    from rollout.api import SamplingParams

    tok, items, model = G.random_w_on_gpu("ncu_layer", args.tokenizer)
    engine = G.w_engine(model, tok.eos_token_id)
    prompts = [it["prompt_ids"] for it in items]
    for seed in range(args.steps):  # compilation, graph capture, warm caches
        engine.generate(prompts, SamplingParams(n=G.W["group"], max_new_tokens=G.W["new_tokens"], seed=seed))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    engine.generate(prompts, SamplingParams(n=G.W["group"], max_new_tokens=G.W["new_tokens"], seed=args.steps))
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
