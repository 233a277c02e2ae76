"""The decode projections' tilings (`rollout.kernels.linear_config`) swept inside W's rollout (bench/grpo_step.py: 64
rows x 256 new tokens), where the weights arrive partly through the L2 prefetch of programmatic dependent launch and
x is re-read from L2 by every column tile: bench/decode_gemm.py times each projection alone, this times the chain.
Each variant overrides one projection family's tiling; a fresh engine per variant (graphs captured with it), the
median of --steps rollouts, two interleaved rounds of which each variant keeps its better median.

    python bench/linear_tile.py --variants default,gate_up=32:128:1:3:4,down=64:128:8:4:4 [--tokenizer DIR]

A variant is `family=bn:bk:splits:stages:warps`; families: qkv, o, gate_up, down; several overrides joined by `+`
form one variant. `pointer` (alone or joined by `+`) loads x and the weights with pointer arithmetic instead of TMA
descriptors (`kernels.LINEAR_TMA`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and engine bench)

FAMILIES = ("qkv", "o", "gate_up", "down")


def parse_variant(spec: str) -> dict:
    """'gate_up=32:128:1:3:4+down=64:128:8:4:4' -> {family: (bn, bk, splits, stages, warps)}; 'default' -> {};
    a `pointer` part -> {"pointer": True}."""
    if spec == "default":
        return {}
    out = {}
    for part in spec.split("+"):
        if part == "pointer":
            out["pointer"] = True
            continue
        fam, _, tiling = part.partition("=")
        fields = tiling.split(":")
        if fam not in FAMILIES or len(fields) != 5 or not all(f.isdigit() for f in fields):
            raise ValueError(f"variant {part!r}: want family=bn:bk:splits:stages:warps, family in {FAMILIES}")
        out[fam] = tuple(int(f) for f in fields)
    return out


def parse_args() -> argparse.Namespace:
    p = G.gpu_bench_parser(__doc__, "variant and round")
    p.add_argument("--variants", default="default", help="comma-separated variants (see above)")
    args = p.parse_args()
    try:
        args.parsed = {v: parse_variant(v) for v in args.variants.split(",")}
    except ValueError as err:
        p.error(f"--variants: {err}")
    return args


@contextlib.contextmanager
def tiled(overrides: dict):
    """`kernels.linear_config` answering `overrides[family]` for the families it names."""
    import rollout.kernels as K

    default, tma = K.linear_config, K.LINEAR_TMA

    def config(n: int, k: int, glu: bool, residual: bool):
        fam = "gate_up" if glu else ("o" if n == k else "down") if residual else "qkv"
        return K.LinearConfig(*overrides[fam]) if fam in overrides else default(n, k, glu, residual)

    K.linear_config, K.LINEAR_TMA = config, tma and not overrides.get("pointer")
    try:
        yield
    finally:
        K.linear_config, K.LINEAR_TMA = default, tma


def main() -> None:
    args = parse_args()
    variants = {name: (lambda o=overrides: tiled(o)) for name, overrides in args.parsed.items()}
    res = G.sweep_w_rollout("linear_tile", args, variants)
    for name, r in sorted(res.items(), key=lambda kv: kv[1].get("time_s", 1e9)):
        print(f"{name:60} {r.get('time_s', float('nan')):8.4f} s")


if __name__ == "__main__":
    main()
