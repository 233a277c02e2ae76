"""Workload W2, a realistic rollout batch: 512 completions (32 GSM8K test prompts x 16) whose lengths vary as real
answers do, on the W model and on a Qwen2.5-1.5B-shape model (random init, bf16). Issue 14's goal 3.

Lengths: drawn once (seed 0) from a log-normal with median 90 tokens and sigma 0.6, clipped to [8, 1024]: mean ~108,
a tail to the cap, like the warm-started SmolLM2's GSM8K answers in the learning run (mean answer length 111 tokens
before GRPO, bench/RESULTS.md). A random-init model almost never samples EOS, so each completion's length is imposed
with the engine contract's per-prompt caps (`generate(prompts, params, max_new_tokens=[...])`, one prompt per
completion): the engine does exactly the work real EOS tokens would leave it.

Per model, in one run: the rldock engine (batches of --max-batch-size rows, each decoding until its longest row
ends), the same with `compact=True` (live rows move into a half-size batch whenever at most half are left), optionally
vLLM (continuous batching), and HF static-cache `generate` (it cannot end rows at different
lengths without EOS: every row runs to the longest, so its useful tok/s counts only the drawn lengths). Reported:
useful tok/s (sum of lengths / time), decode steps the engine took, peak memory, and the ideal: the sum of lengths at
W's tok/s rate (bench/grpo_step.py's workload, measured in the same run), with the ratio time / ideal (goal <= 1.5).
A model other than W also gets its own ideal: the sum of lengths at the rate the same engine reaches on W's batch
shape (64 rows x 256 tokens) with that model.

--phases adds one more call of the compacted engine with its pieces timed (a device sync on each side of each):
decode steps and ms per step at each row capacity of the ladder, the compactions' `adopt` and `results`, prefill.

    python bench/w2.py [--models w,1.5b] [--vllm] [--skip-hf] [--hf-steps N] [--phases] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.grpo_step import QWEN05_SHAPE, W, bench_engine, timed, w_items  # noqa: E402

SHAPES = {
    "w": QWEN05_SHAPE,
    "1.5b": dict(QWEN05_SHAPE, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(QWEN05_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # a smoke test on the CPU
}  # fmt: skip
PROMPTS, GROUP, CAP = 32, 16, 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="w,1.5b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="a 49,152-token tokenizer folder")
    p.add_argument("--workdir", default="/tmp/rldock_w2", help="where the random model folders are written")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-batch-size", type=int, default=512, help="rows the rldock engine decodes at once")
    p.add_argument("--completions", type=int, default=PROMPTS * GROUP, help="fewer for a smoke test")
    p.add_argument("--steps", type=int, default=2, help="timed repetitions (median reported)")
    p.add_argument("--vllm", action="store_true", help="also vLLM (rollout/vllm_backend.py)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-steps", type=int, help="timed HF repetitions (default --steps; each is tens of seconds)")
    p.add_argument("--phases", action="store_true", help="also time the compacted engine's pieces (one more call)")
    p.add_argument("--json", help="write every figure here")
    return p.parse_args()


def draw_lengths(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(CAP, max(8, round(math.exp(rng.gauss(math.log(90), 0.6))))) for _ in range(count)]


def model_folder(args, name: str, tok) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(args.workdir) / name
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("qwen2", **SHAPES[name], eos_token_id=tok.eos_token_id)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def gsm8k_chat_prompts(tok, count: int) -> list[list[int]]:
    """The first `count` GSM8K test questions in the chat template, as token ids."""
    from env_servers.gsm8k import PROMPT_TEMPLATE, load_gsm8k

    rows = load_gsm8k(ROOT / "data/gsm8k/test.jsonl")[:count]
    chats = [[{"role": "user", "content": PROMPT_TEMPLATE.format(question=r["question"])}] for r in rows]
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]


def realistic_prompts(tok, count: int) -> list[list[int]]:
    """The first 32 GSM8K test questions in the chat template, each repeated GROUP times (one per completion)."""
    ids = gsm8k_chat_prompts(tok, PROMPTS)
    return [ids[i // GROUP] for i in range(count)]


def sampling(lengths: list[int]):
    """W2's sampling: temperature 1, room for the longest drawn length (each row stops at its own cap)."""
    from rollout.api import SamplingParams

    return SamplingParams(temperature=1.0, max_new_tokens=max(lengths))


def run_engine(engine, prompts, lengths, steps: int, device: str) -> dict:
    import torch

    params = sampling(lengths)
    out = {}

    def once():
        got = engine.generate(prompts, params, lengths)
        out["tokens"] = sum(len(c.token_ids) for c in got)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    med, times = timed(once, steps, 0) if device == "cuda" else (first, [first])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"time_s": med, "times": times, "tokens": out["tokens"], "tok_s": out["tokens"] / med,
            "first_call_s": first, "peak_gib": peak}  # fmt: skip


@contextlib.contextmanager
def timed_pieces(sync):
    """While entered, `rollout.engine._Runner`'s decode (keyed by the runner's row capacity), adopt, results and
    prefill add their wall seconds, between two `sync()` calls, into the yielded dict: piece -> {"s", "steps"}."""
    from rollout.engine import _Runner

    pieces: dict[str, dict] = {}
    saved = {name: getattr(_Runner, name) for name in ("decode", "adopt", "results", "prefill")}

    def wrap(name, fn):
        def call(runner, *args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(runner, *args, **kwargs)
            sync()
            key = f"decode {runner.b_cap} rows" if name == "decode" else name
            piece = pieces.setdefault(key, {"s": 0.0, "steps": 0})
            piece["s"] += time.perf_counter() - t0
            if name == "decode":  # decode(n, check_every, start, shrink_at) returns the step it reached
                piece["steps"] += out - kwargs.get("start", 1)
            return out

        return call

    for name, fn in saved.items():
        setattr(_Runner, name, wrap(name, fn))
    try:
        yield pieces
    finally:
        for name, fn in saved.items():
            setattr(_Runner, name, fn)


def phases(engine, prompts, lengths, device: str) -> dict:
    """One more call of `engine` with its pieces timed (`timed_pieces`)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with timed_pieces(sync) as pieces:
        engine.generate(prompts, sampling(lengths), lengths)
    return dict(sorted(pieces.items(), key=lambda kv: -kv[1]["s"]))


def phase_lines(pieces: dict) -> str:
    return "\n".join(
        f"      {key:18s} {p['s'] * 1e3:9.2f} ms"
        + (f"  {p['steps']:4d} steps  {p['s'] / p['steps'] * 1e3:.3f} ms/step" if p["steps"] else "")
        for key, p in pieces.items()
    )


def decode_steps(lengths: list[int], batch: int) -> int:
    """Decode steps a static batch takes: each batch of `batch` rows runs until its longest row ends."""
    return sum(max(lengths[i : i + batch]) for i in range(0, len(lengths), batch))


def hf_static(path: str, prompts, lengths, tok, steps: int) -> dict:
    """HF generate with a static cache, every row to the longest length (no EOS to end rows earlier)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = (
        torch.arange(width, device="cuda")[None]
        >= torch.tensor([width - len(p) for p in prompts], device="cuda")[:, None]
    ).long()
    kw = dict(max_new_tokens=max(lengths), min_new_tokens=max(lengths), do_sample=True, temperature=1.0, top_p=1.0,
              top_k=0, cache_implementation="static", pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, **kw)
        first = time.perf_counter() - t0
        med, times = timed(lambda: model.generate(ids, attention_mask=mask, **kw), steps, 0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"time_s": med, "times": times, "tok_s": sum(lengths) / med, "first_call_s": first, "peak_gib": peak}


def shape_rate(path: str, tok) -> float:
    """The engine's tok/s on W's batch shape (bench/grpo_step.py) with the model in `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    rate = bench_engine(model, w_items(tok), tok.eos_token_id, 3, 1)["tok_s"]
    del model
    torch.cuda.empty_cache()
    return rate


def bench_model(args, name: str, tok, lengths, res: dict, save) -> None:
    """Every engine on model `name` into `res` (which holds the ideals); each figure is printed and saved as soon as
    it is measured, so a run cut short by a time limit still returns what it measured."""
    import torch

    from rollout.engine import EmbeddedEngine

    path = model_folder(args, name, tok)
    prompts = realistic_prompts(tok, len(lengths))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if name != "w" and args.device == "cuda":
        res["own_rate"] = shape_rate(path, tok)
        res["own_ideal_s"] = sum(lengths) / res["own_rate"]
    for key, compact in (("rldock", False), ("rldock_compact", True)):
        engine = EmbeddedEngine(
            path, device=args.device, dtype=dtype, max_batch_size=args.max_batch_size, compact=compact
        )
        res[key] = run_engine(engine, prompts, lengths, args.steps, args.device)
        res[key]["decode_steps"] = decode_steps(lengths, args.max_batch_size)
        res[key]["compactions"] = engine.compactions
        if compact and args.phases:
            res[key]["phases"] = phases(engine, prompts, lengths, args.device)
        engine.close()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        save(name, key)
    if args.vllm:
        from rollout.vllm_backend import VLLMEngine

        engine = VLLMEngine(path, dtype="bfloat16", max_batch_size=len(lengths), gpu_memory_utilization=0.4)
        res["vllm"] = run_engine(engine, prompts, lengths, args.steps, args.device)
        engine.close()
        save(name, "vllm")
    if not args.skip_hf and args.device == "cuda":
        res["hf_static"] = hf_static(path, prompts, lengths, tok, args.hf_steps or args.steps)
        res["hf_static"]["decode_steps"] = max(lengths)
        torch.cuda.empty_cache()
        save(name, "hf_static")


def line(name: str, key: str, r: dict) -> str:
    """One measured engine of one model, against the ideal (and the model's own ideal where measured)."""
    own = (
        f"  x{r[key]['time_s'] / r['own_ideal_s']:.2f} of its own ideal ({r['own_ideal_s']:.3f} s at "
        f"{r['own_rate']:.0f} tok/s)"
        if "own_rate" in r
        else ""
    )
    return (
        f"{name:5s} {key:14s} {r[key]['time_s']:8.3f} s {r[key]['tok_s']:9.0f} useful tok/s  "
        f"x{r[key]['time_s'] / r['ideal_s']:.2f} of ideal ({r['ideal_s']:.3f} s)  "
        f"steps {r[key].get('decode_steps', '-')}  peak {r[key]['peak_gib']:.1f} GiB{own}"
    )


def main() -> None:
    args = parse_args()

    from rollout.loading import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    lengths = draw_lengths(args.completions)
    res: dict = {"lengths": {"count": len(lengths), "sum": sum(lengths), "mean": sum(lengths) / len(lengths),
                             "max": max(lengths), "distribution": "lognormal(median 90, sigma 0.6), [8, 1024], seed 0"}}  # fmt: skip

    def save(name: str, key: str) -> None:
        print(line(name, key, res[name]), flush=True)
        if "phases" in res[name][key]:
            print(phase_lines(res[name][key]["phases"]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    if args.device == "cuda":  # W's rate, the ideal's yardstick, in this run
        res["w_rate"] = shape_rate(model_folder(args, "w", tok), tok)
    else:
        res["w_rate"] = float(W["prompts"] * W["group"] * W["new_tokens"])  # CPU smoke test: a placeholder rate
    for name in args.models.split(","):
        res[name] = {"useful_tokens": sum(lengths), "ideal_s": sum(lengths) / res["w_rate"]}
        bench_model(args, name, tok, lengths, res[name], save)


if __name__ == "__main__":
    main()
