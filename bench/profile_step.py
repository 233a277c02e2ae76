"""Where the time goes on workload W (see bench/grpo_step.py): GPU kernel time by kind against wall time for one
engine rollout (fused kernels, run without graphs so each kernel is traced) and for one learner update
(trainer.learner.Learner.update), then the learner timed under variants that show what bounds it.

    python bench/profile_step.py [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (the W model, prompts and trainer pieces)

KINDS = (
    ("gemm", ("gemm", "cutlass", "sm90_", "sm80_", "xmma", "cublas", "nvjet", "_linear_kernel")),
    ("attention", ("attention", "fmha", "flash", "attn")),
    ("rmsnorm", ("rmsnorm", "norm")),
    ("silu", ("silu",)),
    ("sample/softmax/lse", ("sample", "softmax", "logsumexp", "gather")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "cast", "convert", "to_copy")),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct")
    p.add_argument("--workdir", default="/tmp/rldock_w")
    p.add_argument("--json")
    return p.parse_args()


def kernel_split(fn) -> tuple[float, dict[str, float]]:
    """Wall seconds of fn() and the GPU kernel seconds it ran, grouped by KINDS (the rest under 'other')."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    split: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if ev.device_type.name != "CUDA" or not us:
            continue
        name = ev.key.lower()
        kind = next((k for k, keys in KINDS if any(s in name for s in keys)), "other")
        split[kind] = split.get(kind, 0.0) + us / 1e6
        top.append((us / 1e3, f"{kind}: {ev.key[:90]} x{ev.count}"))
    split["top_ms"] = sorted(top, reverse=True)[:12]
    # copies are many small kernels, below the top 12; listed apart so the next cast to remove has a name
    split["top_copy_ms"] = sorted((t for t in top if t[1].startswith("copy/cast")), reverse=True)[:8]
    return wall, split


def fmt(wall: float, split: dict) -> str:
    kinds = {k: v for k, v in split.items() if not k.startswith("top_")}
    total = sum(kinds.values())
    parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    listed = split.get("top_ms", []) + [t for t in split.get("top_copy_ms", []) if t not in split.get("top_ms", [])]
    top = "".join(f"\n    {ms:7.2f} ms  {name}" for ms, name in listed)
    return f"wall {wall * 1e3:.1f} ms, kernels {total * 1e3:.1f} ms ({total / wall:.0%} busy): {parts}{top}"


def profile_rollout(model, items, eos: int) -> dict:
    import torch

    from rollout.api import SamplingParams
    from rollout.engine import EmbeddedEngine

    engine = EmbeddedEngine.from_module(model, eos_token_ids=[eos], dtype=torch.bfloat16, cuda_graphs=False)
    params = SamplingParams(n=G.W["group"], max_new_tokens=G.W["new_tokens"], seed=0)
    prompts = [it["prompt_ids"] for it in items]
    engine.generate(prompts, params)
    wall, split = kernel_split(lambda: engine.generate(prompts, params))
    engine.close()
    return {"wall_s": wall, "kernels_s": split}


def time_update(run, trajs, steps: int = 3) -> float:
    """Median wall time of the learner's update; the first call (compile, allocator growth) is not timed."""
    import torch

    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run.learner.update(trajs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


LEARNER_VARIANTS = {"": {}, "_autocast": {"compute_copy": False}}
"""Tag -> rldock_run overrides: the trainer's defaults (bf16 compute copy of the fp32 master, compiled layers), and
autocast over the fp32 weights instead of the copy (the learner before issue 14)."""


def profile_learner(path: str, tok, items) -> dict:
    """The trainer's update as it runs (fp32 master weights, bf16 compute copy, chunked logprobs, fused AdamW,
    compiled decoder layers), its kernel split, and the same update at other micro-batch sizes and variants."""
    out: dict = {}
    for tag, overrides in LEARNER_VARIANTS.items():
        run = G.rldock_run(path, tok, 64, **overrides)
        trajs = [t for t in run.workflow.run(run.engine, items, list(range(len(items)))) if t is not None]
        run.engine.close()
        for mb in (64, 32, 16):
            run.learner.micro_batch_size = mb
            out[f"update{tag}_mb{mb}_s"] = time_update(run, trajs)
        run.learner.micro_batch_size = 64
        out[f"profile{tag}_mb64"] = kernel_split(lambda run=run, trajs=trajs: run.learner.update(trajs))
        del run
    return out


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    path, tok, params = G.make_model_folder(args)
    items = G.w_items(tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    res = {"rollout_nograph": profile_rollout(model, items, tok.eos_token_id)}
    del model
    torch.cuda.empty_cache()
    res["learner"] = profile_learner(path, tok, items)
    flops = 6 * params * G.W["prompts"] * G.W["group"] * (G.W["prompt_tokens"] + G.W["new_tokens"])
    print(f"GPU: {torch.cuda.get_device_name()}")
    r = res["rollout_nograph"]
    print(f"rollout, fused kernels without graphs: {fmt(r['wall_s'], r['kernels_s'])}")
    for tag in LEARNER_VARIANTS:
        wall, split = res["learner"][f"profile{tag}_mb64"]
        print(f"learner update{tag} mb64: {fmt(wall, split)}")
    for k, v in res["learner"].items():
        if k.endswith("_s"):
            print(f"learner {k[:-2]}: {v:.3f} s = {flops / v / 1e12:.0f} TFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
