"""Rollout and learner sharing one GPU (workload W, see bench/grpo_step.py): why one step of staleness gains little
on a single GPU, and whether giving each phase its own SMs (CUDA green contexts) would.

For each split "R:L" (R SMs for the engine, L for the learner; "all" = no partition), one fresh set of trainer
pieces (grpo_step.rldock_run) and:
- the rollout alone (trainer's synchronous source) and the learner update alone, each confined to its SMs;
- the async step (rollout.max_staleness = 1: the producer thread generates the next batch on the engine's stream
  while the learner trains), phases as in grpo_step: wait for the batch, learner, weight push (which waits for the
  generation in flight).
The engine's stream is replaced by the green context's before its first generation, so its CUDA graphs are captured
there and keep the partition. torch's GreenContext.create does not say which SMs it takes: two partitions may
overlap, so an async figure under a split is what this API gives, not the best a disjoint split could.

    python bench/sm_share.py [--splits all,48:80,32:96] [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (the W model, prompts and trainer pieces)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default="all,48:80,32:96", help="comma-separated R:L SM counts, or all")
    p.add_argument("--steps", type=int, default=5, help="timed steps per figure (median reported)")
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="a 49,152-token tokenizer folder")
    p.add_argument("--workdir", default="/tmp/rldock_w", help="where the random model folder is written")
    p.add_argument("--micro-batch", type=int, default=64, help="learner micro-batch (sequences)")
    p.add_argument("--json", help="write every figure here (after each split)")
    return p.parse_args()


def streams(split: str):
    """(engine stream or None, learner stream or None, the contexts to keep alive) for one split."""
    if split == "all":
        return None, None, ()
    from torch.cuda.green_contexts import GreenContext

    engine_sms, learner_sms = (int(x) for x in split.split(":"))
    ge, gl = GreenContext.create(num_sms=engine_sms), GreenContext.create(num_sms=learner_sms)
    return ge.Stream(), gl.Stream(), (ge, gl)


def measure(split: str, path: str, tok, items, args) -> dict:
    import torch

    from trainer.async_rollout import make_source

    run = G.rldock_run(path, tok, args.micro_batch)
    engine_stream, learner_stream, _alive = streams(split)  # the green contexts outlive their streams
    if engine_stream is not None:
        run.engine._stream = engine_stream  # before the first generation: the graphs are captured on it
    on_learner = (lambda: torch.cuda.stream(learner_stream)) if learner_stream else contextlib.nullcontext
    sampler = lambda: (items, list(range(len(items))))  # noqa: E731
    version = run.engine.weight_version

    def step(source, phases):
        nonlocal version
        t0 = time.perf_counter()
        trajs = [t for t in source.next_batch(version) if t is not None]
        torch.cuda.current_stream().synchronize()  # not device-wide: a generation in flight keeps running
        t1 = time.perf_counter()
        with on_learner():
            run.learner.update(trajs)
            torch.cuda.current_stream().synchronize()
        t2 = time.perf_counter()
        version = run.sync.push(run.model, version + 1)
        torch.cuda.current_stream().synchronize()
        phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    out = {"split": split}
    for name, staleness in (("sync", 0), ("async", 1)):
        source, phases = make_source(run.engine, run.workflow, sampler, staleness), []
        for _ in range(args.steps + 2):
            step(source, phases)
        source.close()
        timed = phases[2:]
        out[name] = {
            "step_s": statistics.median(sum(p) for p in timed),
            **{k: statistics.median(p[i] for p in timed) for i, k in enumerate(("batch_s", "learner_s", "push_s"))},
        }
    run.engine.close()
    return out


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("sm_share: needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    path, tok, _ = G.make_model_folder(args)
    items = G.w_items(tok)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"GPU: {torch.cuda.get_device_name()} ({sms} SMs)  torch {torch.__version__}", flush=True)
    print(
        f"{'split R:L':10s} {'rollout':>8s} {'learner':>8s} {'sum':>7s} {'async':>7s}  async phases (batch + learner + push)"
    )
    res = []
    for split in args.splits.split(","):
        r = measure(split, path, tok, items, args)
        res.append(r)
        s, a = r["sync"], r["async"]
        print(
            f"{split:10s} {s['batch_s']:8.3f} {s['learner_s']:8.3f} {s['batch_s'] + s['learner_s']:7.3f} "
            f"{a['step_s']:7.3f}  {a['batch_s']:.3f} + {a['learner_s']:.3f} + {a['push_s']:.3f}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
