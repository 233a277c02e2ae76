"""W's 64 rows as two half-batches decoded at once, each on its own engine stream over the same weights, against
the whole batch on one engine (same process, same model): the decode step is a latency chain that leaves most SMs
idle in its small kernels, so a second chain could fill them; its cost is each weight read twice (from L2 when the
two chains run close together).

    python bench/two_streams.py [--steps 5] [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (W's model, prompts and engine bench)


def twin(engine):
    """A second engine over `engine`'s model object (the same weight tensors), with its own stream and runners."""
    from rollout.engine import EmbeddedEngine

    other = EmbeddedEngine.__new__(EmbeddedEngine)
    other._setup(engine.model, engine.eos_token_ids, engine.max_batch_size, True, 1, True, True)
    return other


def main() -> None:
    import torch

    from rollout.api import SamplingParams
    from rollout.engine import EmbeddedEngine

    args = G.parse_gpu_bench(G.gpu_bench_parser(__doc__, "layout"))
    tok, items, model = G.random_w_on_gpu("two_streams", args.tokenizer)
    a = EmbeddedEngine.from_module(model, eos_token_ids=[tok.eos_token_id], dtype=torch.bfloat16)
    b = twin(a)
    prompts = [it["prompt_ids"] for it in items]
    half = len(prompts) // 2
    seeds = iter(range(10**6))

    def params():
        return SamplingParams(n=G.W["group"], temperature=1.0, max_new_tokens=G.W["new_tokens"], seed=next(seeds))

    def whole() -> int:
        return sum(len(c.token_ids) for c in a.generate(prompts, params()))

    def halves() -> int:
        out = [0, 0]

        def run(i, engine, part):
            out[i] = sum(len(c.token_ids) for c in engine.generate(part, params()))

        threads = [threading.Thread(target=run, args=(0, a, prompts[:half])),
                   threading.Thread(target=run, args=(1, b, prompts[half:]))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(out)

    def one_half() -> int:
        return sum(len(c.token_ids) for c in a.generate(prompts[:half], params()))

    def warm_halves() -> None:  # one engine at a time: captures and compilation never run concurrently
        a.generate(prompts[:half], params())
        b.generate(prompts[half:], params())

    res = {}
    for name, fn, warm in [("whole batch, one stream", whole, whole), ("two halves, two streams", halves, warm_halves),
                           ("one half alone", one_half, one_half)] * 2:  # fmt: skip
        warm()  # graphs, compilation
        times, tokens = [], 0
        for _ in range(args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        if med < res.get(name, {}).get("time_s", float("inf")):
            res[name] = {"time_s": med, "tok_s": tokens / med, "tokens": tokens}
        print(name, json.dumps(res[name]), flush=True)
    base = res["whole batch, one stream"]["time_s"]
    for name, r in res.items():
        print(f"{name:28} {r['time_s']:.4f} s  x{r['time_s'] / base:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
