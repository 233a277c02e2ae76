"""Each stage's share of W's decode step, by ablation: W's rollout (bench/grpo_step.py: 64 rows x 256 new tokens)
timed with one family of the step's kernels replaced by no launch at all (the call returns a zero tensor of the
right shape, allocated before capture), so the difference to the full step is what that family costs *in the chain*
of programmatic-dependent launches, including the latency it exposes, which a kernel's traced time does not show.
Random-init W model (head dim 64, 7 query heads per KV head). The variants run in two interleaved rounds; each keeps
its better median (the machine drifts by a few percent between minutes).

    python bench/ablate_step.py [--drop none,attention,qkv,o,gate_up,down,rms_prep,lm_head,sampling] [--tokenizer DIR]

(RMSNorm: o writes the next one in its epilogue, qkv and gate_up apply theirs; `rms_prep` is the launch left for
the embeddings and for down's K-slice partials: `rollout/kernels.py`.)

The results are timings of wrong computations (the tokens are garbage): never a correctness check.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and engine bench)

FAMILIES = ("attention", "qkv", "o", "gate_up", "down", "rms_prep", "lm_head", "sampling")


def parse_args() -> argparse.Namespace:
    p = G.gpu_bench_parser(__doc__, "variant and round")
    p.add_argument(
        "--drop", default="none," + ",".join(FAMILIES), help=f"comma-separated, of none,{','.join(FAMILIES)}"
    )
    args = G.parse_gpu_bench(p)
    bad = set(args.drop.split(",")) - {"none", *FAMILIES}
    if bad:
        p.error(f"--drop: unknown {sorted(bad)}; choose from none,{','.join(FAMILIES)}")
    return args


@contextlib.contextmanager
def dropped(family: str):
    """`rollout.kernels` with `family`'s launches replaced by cached zero tensors (none: unchanged)."""
    import torch

    import rollout.kernels as K

    saved = K.rope_attention, K.linear, K.linear_residual, K.sample_rows, K.rms_prep
    zeros: dict = {}

    def zero(shape, like, dtype=None) -> torch.Tensor:
        key = (tuple(shape), dtype or like.dtype, like.device)
        if key not in zeros:  # first seen in the warm-up runs, before the graph is captured
            zeros[key] = torch.zeros(shape, dtype=key[1], device=like.device)
        return zeros[key]

    def linear(x, weight, bias=None, glu=False):
        xg = x.xg if isinstance(x, K.RowNorm) else x
        fam = "gate_up" if glu else "lm_head" if weight.shape[0] > 8 * xg.shape[1] else "qkv"
        if fam != family:
            return saved[1](x, weight, bias, glu)
        return zero((xg.shape[0], weight.shape[0] // (2 if glu else 1)), xg)

    def linear_residual(x, weight, bias, residual, next_weight, eps, cache=None, normalize=False):
        if ("o" if x.shape[1] == weight.shape[0] else "down") != family:
            return saved[2](x, weight, bias, residual, next_weight, eps, cache, normalize)
        if normalize:
            return zero(residual.shape, residual)
        return K.RowNorm(zero(residual.shape, residual), zero((1, x.shape[0]), x, torch.float32), eps)

    if family == "attention":
        K.rope_attention = lambda qkv, kc, vc, cos, sin, ctr, pad, heads: zero(
            (qkv.shape[0], heads * kc.shape[-1]), qkv
        )
    elif family == "sampling":
        K.sample_rows = lambda *a, **kw: None
    elif family == "rms_prep":
        K.rms_prep = lambda x, delta, weight, eps, cache=None, embed=None: K.RowNorm(
            zero(x.shape, x), zero((1, x.shape[0]), x, torch.float32), eps
        )
    elif family != "none":
        K.linear, K.linear_residual = linear, linear_residual
    try:
        yield
    finally:
        K.rope_attention, K.linear, K.linear_residual, K.sample_rows, K.rms_prep = saved


def main() -> None:
    args = parse_args()
    tok, items, model = G.random_w_on_gpu("ablate_step", args.tokenizer)

    def measure() -> dict:
        r = G.bench_engine(model, items, tok.eos_token_id, args.steps, 1)
        return {k: r[k] for k in ("time_s", "tokens", "tok_s")}

    variants = {fam: (lambda fam=fam: dropped(fam)) for fam in args.drop.split(",")}
    res = G.best_of_rounds(variants, measure, args.json)
    base = res.get("none", {}).get("time_s")
    print(f"{'dropped':10} {'rollout s':>10} {'tokens':>7} {'saves s':>8} {'per step us':>12}")
    for fam, r in res.items():
        saves = base - r["time_s"] if base else float("nan")
        print(f"{fam:10} {r['time_s']:10.4f} {r['tokens']:7d} {saves:8.4f} {saves / G.W['new_tokens'] * 1e6:12.1f}")


if __name__ == "__main__":
    main()
