"""The decode attention kernel's tile (`rollout.kernels.ATTN_TILE`: key slots per loop iteration, warps), swept on
workload W's rollout (bench/grpo_step.py: 64 rows x 256 new tokens, prompts of 32) for W's model (head dim 64, 7
query heads per KV head) and a Qwen2.5-1.5B-shape model (head dim 128, 6 per KV head), random init. Each tile: a
fresh engine (graphs captured with it), the median of --steps rollouts; the tiles are run in two interleaved rounds
and each keeps its better median (the machine drifts by a few percent between minutes). A tile whose kernel does not
fit the GPU's shared memory is reported as failed.

    python bench/attn_tile.py [--tiles 64:4,128:4,256:4,128:8,256:8] [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's prompts and engine bench)
from w2 import SHAPES  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = G.gpu_bench_parser(__doc__, "tile and round")
    p.add_argument("--tiles", default="64:4,128:4,256:4,128:8,256:8", help="comma-separated BLOCK_N:warps")
    p.add_argument("--models", default="w,1.5b", help=f"comma-separated, of {sorted(SHAPES)}")
    return G.parse_gpu_bench(p)


@contextlib.contextmanager
def tile(t: tuple[int, int]):
    import rollout.kernels as K

    saved, K.ATTN_TILE = K.ATTN_TILE, t
    try:
        yield
    finally:
        K.ATTN_TILE = saved


def main() -> None:
    args = parse_args()
    tok, items = G.gpu_or_exit("attn_tile", args.tokenizer)
    import torch

    tiles = [tuple(int(x) for x in t.split(":")) for t in args.tiles.split(",")]
    res: dict = {}
    for name in args.models.split(","):
        model = G.random_model(SHAPES[name], tok)

        def measure(model=model) -> dict:
            return G.bench_engine(model, items, tok.eos_token_id, args.steps, 1)

        variants = {f"{t[0]}:{t[1]}": (lambda t=t: tile(t)) for t in tiles}
        res[name] = G.best_of_rounds(variants, measure, None)
        base = res[name].get("64:4", {}).get("time_s")
        for key, r in res[name].items():
            if "failed" in r:
                print(f"{name:5s} tile {key:6s} failed: {r['failed']}", flush=True)
            else:
                ratio = f"  x{base / r['time_s']:.3f} vs 64:4" if base else ""
                print(f"{name:5s} tile {key:6s} {r['time_s']:.4f} s  {r['tok_s']:8.0f} tok/s{ratio}", flush=True)
        del model
        torch.cuda.empty_cache()
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
