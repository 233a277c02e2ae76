"""The embedded engine on the CPU with a GRPO-shaped batch: SmolLM2-135M-Instruct, the first --prompts GSM8K test
questions in the chat template, n completions each, --new tokens, 2 threads. With --tree, each given checkout of
rldock (e.g. a `git worktree` of an older commit) is timed too, in its own process, rounds interleaved, so the
ratio between trees comes from one run.

    python bench/cpu_rollout.py [--tree /tmp/old-rldock] [--prompts 4 --n 8 --new 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="another rldock checkout to time (repeatable)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name or an HF folder")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8, help="completions per prompt")
    p.add_argument("--new", type=int, default=16, help="new tokens per completion")
    p.add_argument("--steps", type=int, default=3, help="timed generate calls per round (median reported)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time the tree at this path
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)  # internal: the prompts' token ids (JSON)
    return p.parse_args()


def worker(args: argparse.Namespace) -> None:
    """Time `generate` over the prompts in args.prompts_file with the rldock checkout at args.worker first on
    sys.path; one JSON line."""
    sys.path.insert(0, args.worker)
    import torch

    from rollout.api import SamplingParams
    from rollout.engine import EmbeddedEngine

    torch.set_num_threads(2)
    prompts = json.loads(Path(args.prompts_file).read_text())
    engine = EmbeddedEngine(args.model, seed=0)
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new, seed=1)
    engine.generate(prompts, params)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "tokens": sum(len(c.token_ids) for c in out)}))


def time_tree(tree: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", tree, "--model", args.model, "--prompts-file", args.prompts_file,
           "--n", str(args.n), "--new", str(args.new), "--steps", str(args.steps)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if out.returncode != 0:
        sys.exit(f"cpu_rollout: {tree}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT))
    from rollout.loading import ModelNotFoundError, resolve_model_path

    try:
        model = resolve_model_path(args.model)  # a built-in one is converted here, once
    except ModelNotFoundError as err:
        sys.exit(f"cpu_rollout: {err}")
    args.model = str(Path(model).resolve()) if Path(model).exists() else model  # the workers run in other folders
    trees = [str(ROOT), *args.tree]
    for tree in trees:
        if not Path(tree, "rollout/engine.py").is_file():
            sys.exit(f"cpu_rollout: --tree {tree} is not an rldock checkout (no rollout/engine.py)")
    from bench.w2 import gsm8k_chat_prompts
    from rollout.loading import load_tokenizer

    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:  # one prompt list for every tree, tokenized here
        args.prompts_file = str(Path(tmp, "prompts.json"))
        Path(args.prompts_file).write_text(json.dumps(gsm8k_chat_prompts(load_tokenizer(args.model), args.prompts)))
        for _ in range(args.rounds):
            for tree in trees:
                r = time_tree(tree, args)
                if r["median_s"] < best.get(tree, {}).get("median_s", float("inf")):
                    best[tree] = r
    for tree, r in best.items():
        ratio = best[trees[0]]["median_s"] / r["median_s"]
        print(f"{tree:40} {r['median_s']:7.3f} s  {r['tokens']} tokens  x{ratio:.2f} vs this tree")
    if args.json:
        Path(args.json).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
