"""When each kernel of W's decode step finishes, from inside the chain: after every launch of the step a one-program
"stamp" kernel (a programmatic dependent like the step's kernels) waits for it and writes the GPU's %globaltimer,
so the gap between two stamps is what that kernel adds to the step, prologue overlap and waiting included. The stamp
releases its successor before it waits, so the next kernel still launches early and prefetches its weights as in the
engine. W's rollout (bench/grpo_step.py: 64 rows x 256 new tokens), random-init W model; the stamps of the last
replay of the CHECK_EVERY-step graph are read back: each kernel's gaps, median and sum per step.

    python bench/timeline.py [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and engine bench)

# `rollout.kernels`' launching entry points (every Triton projection goes through `_launch`)
STAMPED = ("_launch", "rms_prep", "rope_attention", "finish", "sample_rows")


def _label(name: str, args, kwargs) -> str:
    if name == "_launch":  # (x, weight, bias, n, glu, norm, resid)
        x, n, glu, resid = args[0], args[3], args[4], args[6]
        return "gate_up" if glu else ("o" if x.shape[1] == n else "down") if resid is not None else "qkv"
    if name == "rms_prep":
        return "embed+rms_prep" if args[1] is None else "rms_prep"
    if name == "finish":  # with nothing to apply it launches nothing: the gap is the cuBLAS lm_head before it
        return "final norm" if any(a is not None and a is not False for a in args[1:]) or kwargs else "lm_head (cuBLAS)"
    return {"rope_attention": "attention", "sample_rows": "sampling (2)"}[name]


@contextlib.contextmanager
def stamped(buf, labels: list[str], spans: list[tuple[int, int, int]]):
    """`rollout.kernels`' entry points each followed by a stamp kernel; `labels` collects what each slot of `buf`
    (int64 ns) stamps, in launch order; `spans` the (steps, first, end) slots of every graph a runner records."""
    from stamp_kernel import stamp

    import rollout.engine as E
    import rollout.kernels as K

    saved = {name: getattr(K, name) for name in STAMPED}
    record = E._Runner._record

    def wrap(name, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if len(labels) < buf.numel():
                on = K.pdl(buf)
                stamp[(1,)](buf, len(labels), on, launch_pdl=on)
                labels.append(_label(name, args, kwargs))
            return out

        return call

    def recorded(runner, steps: int):
        first = len(labels)
        graph = record(runner, steps)
        spans.append((steps, first, len(labels)))
        return graph

    for name, fn in saved.items():
        setattr(K, name, wrap(name, fn))
    E._Runner._record = recorded
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
        E._Runner._record = record


def main() -> None:
    p = G.gpu_bench_parser(__doc__, "run")
    args = G.parse_gpu_bench(p)
    tok, items, model = G.random_w_on_gpu("timeline", args.tokenizer)
    import torch

    from rollout.api import SamplingParams
    from rollout.engine import CHECK_EVERY

    buf = torch.zeros(1 << 16, dtype=torch.int64, device="cuda")
    labels: list[str] = []
    spans: list[tuple[int, int, int]] = []
    prompts = [it["prompt_ids"] for it in items]
    params = SamplingParams(n=G.W["group"], temperature=1.0, max_new_tokens=G.W["new_tokens"], seed=0)
    with stamped(buf, labels, spans):
        engine = G.w_engine(model, tok.eos_token_id)
        engine.generate(prompts, params)  # compiles, captures the 1-step and the CHECK_EVERY-step graph
        t_run = G.timed(lambda: engine.generate(prompts, params), args.steps, 0)[0]
    steps, first, end = next(sp for sp in reversed(spans) if sp[0] == CHECK_EVERY)
    per_step = (end - first) // steps
    stamps, names = buf[first:end].tolist(), labels[first:end]  # the last replay of that graph
    gaps: dict[str, list[float]] = {}
    for i in range(1, len(stamps)):
        gaps.setdefault(names[i], []).append((stamps[i] - stamps[i - 1]) / 1e3)
    step_us = (stamps[-1] - stamps[0]) / 1e3 / (len(stamps) - 1) * per_step
    res = {"rollout_s": t_run, "step_us": step_us, "launches_per_step": per_step, "kernels": {}}
    print(f"rollout {t_run:.4f} s with the stamps; one step {step_us:.1f} us, {per_step} stamped entry points per step")
    print(f"{'kernel':18} {'per step':>8} {'median us':>10} {'us/step':>9}")
    for name, g in sorted(gaps.items(), key=lambda kv: -sum(kv[1])):
        per = sum(g) / steps
        res["kernels"][name] = {"per_step": len(g) / steps, "median_us": statistics.median(g), "us_per_step": per}
        print(f"{name:18} {len(g) / steps:8.1f} {statistics.median(g):10.2f} {per:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
