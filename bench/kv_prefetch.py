"""Which kernel asks L2 for a layer's KV cache (rollout.kernels.KV_PREFETCH): the attention or the rms_prep before
qkv; W's rollout, each a fresh engine, two interleaved rounds.

    python bench/kv_prefetch.py [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402


@contextlib.contextmanager
def where(mode: str):
    import rollout.kernels as K

    saved, K.KV_PREFETCH = K.KV_PREFETCH, mode
    try:
        yield
    finally:
        K.KV_PREFETCH = saved


def main() -> None:
    args = G.gpu_bench_parser(__doc__, "variant and round").parse_args()
    tok, items, model = G.random_w_on_gpu("kv_prefetch", args.tokenizer)

    def measure() -> dict:
        r = G.bench_engine(model, items, tok.eos_token_id, args.steps, 1)
        return {"time_s": r["time_s"], "tok_s": r["tok_s"]}

    variants = {m: (lambda m=m: where(m)) for m in ("attention", "rms_prep", "none")}
    res = G.best_of_rounds(variants, measure, args.json, rounds=3)
    for name, r in res.items():
        print(f"{name:10} {r.get('time_s', float('nan')):.4f} s")


if __name__ == "__main__":
    main()
