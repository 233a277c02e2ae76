"""Full GSM8K test set (1,319 questions) through the embedded engine: greedy, 320 new tokens, chat-template prompts
built as the trainer builds them (trainer.data, the default boxed prompt), scored by env_servers.gsm8k.score.

Prints lenient accuracy (the last boxed value, else the last number, equals the gold answer) and strict accuracy
(the answer is inside \\boxed{} and correct), plus the wall times: engine load, generation on a cold engine (kernel
compilation and graph capture included), generation again on the warm engine, scoring.

    python bench/gsm8k_eval.py [--model smollm2-135m-instruct] [--limit N] [--batch 1320] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF folder, hub id or built-in name")
    p.add_argument("--models-dir", default="models", help="where built-in models are converted")
    p.add_argument("--test", default=str(ROOT / "data/gsm8k/test.jsonl"), help="GSM8K test JSONL")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--batch", type=int, default=1320, help="engine max_batch_size (sequences decoded at once)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=2, help="generation passes (the first one is cold)")
    p.add_argument("--json", help="write figures and per-question results here")
    return p.parse_args()


def load_items(path: str, tokenizer, limit: int | None) -> list[dict]:
    from env_servers.gsm8k import load_gsm8k
    from trainer.config import DataConfig
    from trainer.data import prepare_items

    return prepare_items(load_gsm8k(path), tokenizer, DataConfig(), max_prompt_tokens=10**6, limit=limit)


def score_all(items: list[dict], texts: list[str]) -> tuple[float, float]:
    from env_servers.gsm8k import score

    results = [score(t, it["answer"]) for it, t in zip(items, texts, strict=True)]
    n = max(len(results), 1)
    return sum(r["correct"] for r in results) / n, sum(r["strict"] for r in results) / n


def main() -> None:
    args = parse_args()
    import torch

    from rollout.api import SamplingParams
    from rollout.engine import EmbeddedEngine
    from rollout.loading import load_tokenizer, resolve_model_path

    t0 = time.perf_counter()
    path = resolve_model_path(args.model, args.models_dir)
    tokenizer = load_tokenizer(path)
    items = load_items(args.test, tokenizer, args.limit)
    engine = EmbeddedEngine(path, device=args.device, max_batch_size=args.batch)
    t_load = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    gen_times = []
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        out = engine.generate([it["prompt_ids"] for it in items], params)
        gen_times.append(time.perf_counter() - t1)
    t2 = time.perf_counter()
    texts = tokenizer.batch_decode([c.token_ids for c in out], skip_special_tokens=True)
    lenient, strict = score_all(items, texts)
    t_score = time.perf_counter() - t2
    tokens = sum(len(c.token_ids) for c in out)
    res = {
        "questions": len(items), "lenient": lenient, "strict": strict, "load_s": t_load, "generate_s": gen_times,
        "score_s": t_score, "completion_tokens": tokens, "stopped": sum(c.finish_reason == "stop" for c in out),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
    }  # fmt: skip
    if args.json:
        res["texts"] = texts
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(
        f"GSM8K test {len(items)} questions, {args.model}, greedy, {args.max_new_tokens} new tokens, {res['gpu']}\n"
        f"lenient {lenient:.2%}  strict {strict:.2%}  ({res['stopped']} stopped, {tokens} completion tokens)\n"
        f"load {t_load:.1f} s | generate cold {gen_times[0]:.2f} s, warm {min(gen_times[1:] or gen_times):.2f} s "
        f"({tokens / min(gen_times):.0f} tok/s) | score {t_score:.1f} s | "
        f"end to end (load + cold generate + score) {t_load + gen_times[0] + t_score:.1f} s"
    )


if __name__ == "__main__":
    main()
