"""The working tree's decode kernels (`rollout/kernels.py`) against other versions of that file, in one process on
W's rollout (bench/grpo_step.py: 64 rows x 256 new tokens): the lent GPUs differ by a few percent from machine to
machine, more than most kernel changes gain, so a change is judged only against its predecessor in the same run.
Each version: a fresh engine (graphs captured with it), the median of --steps rollouts, two interleaved rounds of
which each keeps its better median.

    git show HEAD~1:rollout/kernels.py > .carry/kernels_ref.py     # a version to compare, here the last commit's
    python bench/ab_kernels.py --ref .carry/kernels_ref.py [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and engine bench)


def parse_args():
    p = G.gpu_bench_parser(__doc__, "version and round")
    p.add_argument("--ref", action="append", default=[], help="another kernels.py to time (repeatable)")
    args = G.parse_gpu_bench(p)
    for path in args.ref:
        if not Path(path).is_file():
            p.error(f"--ref: no file {path}")
    return args


@contextlib.contextmanager
def kernels_from(path: str | None):
    """`rollout.kernels` loaded from `path` (None: the working tree's) while the block runs."""
    import rollout
    import rollout.kernels as current

    if path is None:
        yield
        return
    spec = importlib.util.spec_from_file_location("rollout.kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["rollout.kernels"], rollout.kernels = module, module
    try:
        yield
    finally:
        sys.modules["rollout.kernels"], rollout.kernels = current, current


def main() -> None:
    args = parse_args()
    variants = {"working tree": lambda: kernels_from(None)}
    variants.update({path: (lambda p=path: kernels_from(p)) for path in args.ref})
    res = G.sweep_w_rollout("ab_kernels", args, variants)
    base = res["working tree"].get("time_s", float("nan"))
    for name, r in sorted(res.items(), key=lambda kv: kv[1].get("time_s", 1e9)):
        t = r.get("time_s", float("nan"))
        print(f"{name:40} {t:8.4f} s  x{t / base:.3f} of the working tree's time")


if __name__ == "__main__":
    main()
