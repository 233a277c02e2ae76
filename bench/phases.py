"""Where W's rollout spends its wall time around the decode steps: the GPU time of the prefill, of the 1-step and the
CHECK_EVERY-step graph replays, and the gaps between them (the GPU idle while the host checks for finished rows and
launches the next replay), from CUDA events recorded around each on the engine's stream. W: bench/grpo_step.py's
64 rows x 256 new tokens, random-init W model; the last of --steps timed rollouts is broken down. --profile: then
one more rollout whose prefill runs under torch.profiler (its ops by GPU and by host time; a prefill the engine
replays as a CUDA graph shows as the graph's launch).

    python bench/phases.py [--profile] [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and engine bench)


class _Timed:
    """A graph (or any `replay`-able) whose replays record a start and an end event under `label`."""

    def __init__(self, inner, label: str, log: list):
        self.inner, self.label, self.log = inner, label, log

    def replay(self) -> None:
        with _span(self.label, self.log):
            self.inner.replay()


@contextlib.contextmanager
def _span(label: str, log: list):
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    yield
    end.record()
    log.append((label, start, end))


@contextlib.contextmanager
def traced(log: list, profiles: list):
    """The engine's runners with every prefill and graph replay timed into `log`; while `profiles` holds None, the
    next prefill runs under torch.profiler and replaces it."""
    import torch

    import rollout.engine as E

    capture, prefill = E._Runner.capture, E._Runner.prefill

    def captured(runner) -> None:
        capture(runner)
        runner.graph, runner.chunk = _Timed(runner.graph, "1-step replay", log), _Timed(runner.chunk, "chunk", log)

    def prefilled(runner, *a, **kw) -> bool:
        if None in profiles:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                captured = prefill(runner, *a, **kw)
                torch.cuda.synchronize()
            profiles[profiles.index(None)] = prof
            return captured
        with _span("prefill", log):
            return prefill(runner, *a, **kw)

    E._Runner.capture, E._Runner.prefill = captured, prefilled
    try:
        yield
    finally:
        E._Runner.capture, E._Runner.prefill = capture, prefill


def breakdown(log: list) -> dict:
    """Per label: count and GPU ms; the gaps before each label's spans (ms); the span from the first start to the
    last end."""
    out: dict = {"busy_ms": {}, "count": {}, "gap_before_ms": {}}
    prev = None
    for label, start, end in log:
        out["busy_ms"][label] = out["busy_ms"].get(label, 0.0) + start.elapsed_time(end)
        out["count"][label] = out["count"].get(label, 0) + 1
        if prev is not None:
            out["gap_before_ms"][label] = out["gap_before_ms"].get(label, 0.0) + prev.elapsed_time(start)
        prev = end
    out["span_ms"] = log[0][1].elapsed_time(log[-1][2])
    return out


def main() -> None:
    p = G.gpu_bench_parser(__doc__, "run")
    p.add_argument("--profile", action="store_true", help="also profile one prefill's ops")
    args = p.parse_args()
    tok, items, model = G.random_w_on_gpu("phases", args.tokenizer)
    import torch

    from rollout.api import SamplingParams

    prompts = [it["prompt_ids"] for it in items]
    params = SamplingParams(n=G.W["group"], temperature=1.0, max_new_tokens=G.W["new_tokens"], seed=0)
    log: list = []
    profiles: list = []
    with traced(log, profiles):
        engine = G.w_engine(model, tok.eos_token_id)
        engine.generate(prompts, params)  # compiles and captures
        for _ in range(args.steps):
            log.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(prompts, params)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        res = breakdown(log) | {"wall_ms": wall * 1e3}
        if args.profile:
            profiles.append(None)
            engine.generate(prompts, params)
    print(f"wall {res['wall_ms']:.2f} ms; GPU span from the prefill's start to the last replay's end "
          f"{res['span_ms']:.2f} ms")  # fmt: skip
    print(f"{'phase':14} {'count':>5} {'GPU ms':>8} {'idle before, ms':>16}")
    for label, busy in res["busy_ms"].items():
        gap = res["gap_before_ms"].get(label, 0.0)
        print(f"{label:14} {res['count'][label]:5d} {busy:8.2f} {gap:16.3f}")
    for prof in profiles:
        for key in ("cuda_time_total", "cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=14))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
