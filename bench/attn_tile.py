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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's prompts and engine bench)
from w2 import SHAPES  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", default="64:4,128:4,256:4,128:8,256:8", help="comma-separated BLOCK_N:warps")
    p.add_argument("--models", default="w,1.5b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--steps", type=int, default=3, help="timed rollouts per tile and round (median reported)")
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="a 49,152-token tokenizer folder")
    p.add_argument("--json", help="write every figure here (after each model)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not torch.cuda.is_available():
        sys.exit("attn_tile: needs a CUDA GPU")
    import rollout.kernels as K
    from rollout.loading import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    items = G.w_items(tok)
    tiles = [tuple(int(x) for x in t.split(":")) for t in args.tiles.split(",")]
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    res: dict = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("qwen2", **SHAPES[name], eos_token_id=tok.eos_token_id)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda()
        res[name] = {}
        for _ in range(2):
            for tile in tiles:
                K.ATTN_TILE, key = tile, f"{tile[0]}:{tile[1]}"
                try:
                    r = G.bench_engine(model, items, tok.eos_token_id, args.steps, 1)
                except Exception as err:  # noqa: BLE001 - a tile that does not compile is a result
                    res[name][key] = {"failed": repr(err)[:200]}
                    continue
                best = res[name].get(key, {}).get("time_s", float("inf"))
                if r["time_s"] < best:
                    res[name][key] = r
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
