"""Does a decode batch split in two, each half on its own CUDA stream, fill the GPU's idle time? W's rollout
(bench/grpo_step.py: 8 prompts x 8 = 64 rows x 256 new tokens) as one engine's batch of 64, against the same prompts
as `--parts` engines (each its own weights and stream, prompts dealt round-robin) generating at once from as many
threads, and one after another. The decode step is latency-bound (bench/ablate_step.py): a second independent chain
of kernels could run in the gaps of the first, at the price of reading every weight once per part.

    python bench/split_batch.py [--parts 2,4] [--steps 3] [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model and prompts, `timed`)


def parse_args() -> argparse.Namespace:
    p = G.gpu_bench_parser(__doc__, "layout")
    p.add_argument("--parts", default="2,4", help="comma-separated numbers of concurrent engines")
    args = p.parse_args()
    args.parts = G.int_list(p, "--parts", args.parts)
    if any(n < 1 or G.W["prompts"] % n for n in args.parts):
        p.error(f"--parts: each must divide the {G.W['prompts']} prompts")
    return args


def main() -> None:
    args = parse_args()
    tok, items, model = G.random_w_on_gpu("split_batch", args.tokenizer)
    import torch

    from rollout.api import SamplingParams
    from rollout.engine import EmbeddedEngine

    prompts = [it["prompt_ids"] for it in items]
    params = SamplingParams(n=G.W["group"], temperature=1.0, max_new_tokens=G.W["new_tokens"], seed=0)
    res: dict = {}

    def run(engines, concurrent: bool) -> float:
        shares = [prompts[i :: len(engines)] for i in range(len(engines))]
        for e, share in zip(engines, shares, strict=True):  # one at a time: compiles and captures the graphs
            e.generate(share, params)
        counts: list[int] = []

        def generate(e, share):
            counts.append(sum(len(c.token_ids) for c in e.generate(share, params)))

        def once():
            counts.clear()
            if concurrent:
                threads = [threading.Thread(target=generate, args=pair) for pair in zip(engines, shares, strict=True)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for pair in zip(engines, shares, strict=True):
                    generate(*pair)
            if len(counts) != len(engines):
                raise RuntimeError(f"{len(engines) - len(counts)} of the {len(engines)} generations failed")

        t = G.timed(once, args.steps, 1)[0]
        return t, sum(counts)

    for parts in [1, *args.parts]:
        engines = [
            EmbeddedEngine.from_module(model, eos_token_ids=[tok.eos_token_id], dtype=torch.bfloat16)
            for _ in range(parts)
        ]
        modes = [True] if parts == 1 else [True, False]
        for concurrent in modes:
            key = f"{parts} x {64 // parts} rows, {'concurrent' if concurrent else 'one after another'}"
            t, tokens = run(engines, concurrent)
            res[key] = {"time_s": t, "tokens": tokens, "tok_s": tokens / t}
            print(f"{key:45} {t:8.4f} s {tokens:6d} tokens {tokens / t:10.0f} tok/s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1))
        for e in engines:
            e.close()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
