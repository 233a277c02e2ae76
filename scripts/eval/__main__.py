"""`python -m scripts.eval`: the command line and the resumable run (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from env_servers.gsm8k import PROMPT_TEMPLATE
from rollout.api import SamplingParams
from scripts.eval import EvalError, env_var
from scripts.eval.metrics import markdown, summarize
from scripts.eval.targets import make_target
from scripts.eval.tasks import EnvTask, GSM8KTask

DEFAULT_DATA = "data/gsm8k/test.jsonl"
RESUME_KEYS = ("target", "model", "task", "k", "temperature", "top_p", "max_new_tokens", "max_round", "prompt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.eval",
        description="Evaluate a model on GSM8K or an env server; reports accuracy, mean reward, avg@k, pass@k.",
    )
    t = p.add_argument_group("target")
    t.add_argument("--model", default=env_var("MODEL"), help="local model path/id/built-in, or the served name (MODEL)")
    t.add_argument(
        "--openai-base-url", default=env_var("OPENAI_BASE_URL"), help="OpenAI-compatible base, e.g. http://h:8000/v1"
    )
    t.add_argument("--rollout-url", default=env_var("ROLLOUT_URL"), help="rldock rollout service, e.g. http://h:8000")
    t.add_argument("--api", choices=["chat", "completions"], default="chat", help="OpenAI route to use")
    t.add_argument("--device", default="auto", help="local model: auto, cpu, cuda or cuda:N")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    d = p.add_argument_group("task")
    d.add_argument("--data", default=DEFAULT_DATA, help="GSM8K JSONL file or hub id (openai/gsm8k)")
    d.add_argument("--split", default="test", help="split of a hub dataset")
    d.add_argument("--env-url", default=env_var("ENV_URL"), help="env server URL (else ENV/ENV_HOST/ENV_PORT)")
    d.add_argument("--max-round", type=int, default=int(env_var("MAX_ROUND", 20)), help="model turns per episode")
    d.add_argument("--limit", type=int, default=None, help="first N items only")
    d.add_argument(
        "--prompt-template",
        default=None,
        help="first user message, {question} = the question or the env's first observation "
        "(default: the trainer's GSM8K template for --data, the bare observation for env servers)",
    )
    d.add_argument("--system-prompt", default=None, help="system message before the first user turn")
    d.add_argument(
        "--train-config",
        default=None,
        help="a training run's config.yaml (saves/<exp>/config.yaml): its data.prompt_template and data.system_prompt "
        "become the defaults, so the model is asked the way it was trained",
    )
    d.add_argument("--success-threshold", type=float, default=1.0, help="reward counted as a success")
    s = p.add_argument_group("sampling")
    s.add_argument("--k", type=int, default=1, help="samples per item (avg@k, pass@k)")
    s.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) when k=1, else 1.0")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=int, default=320)
    s.add_argument("--seed", type=int, default=None)
    o = p.add_argument_group("run")
    o.add_argument("--concurrency", type=int, default=8, help="items in flight at once")
    o.add_argument("--out-dir", default=None, help="default: saves/eval/<model>__<task>")
    o.add_argument("--overwrite", action="store_true", help="discard a previous run in --out-dir instead of resuming")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.max_round < 1:
        p.error("--concurrency and --max-round must be >= 1")
    if args.temperature is None:
        args.temperature = 0.0 if args.k == 1 else 1.0
    try:
        sampling(args)
    except ValueError as e:  # the bounds of rollout.api, named as the flag
        p.error(f"--{str(e).replace('max_new_tokens', 'max-new-tokens').replace('n must', 'k must')}")
    if args.train_config:
        data = read_train_config(args.train_config, p)
        args.prompt_template = args.prompt_template or data.get("prompt_template")
        args.system_prompt = args.system_prompt or data.get("system_prompt")
    return args


def sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.k, args.temperature, args.top_p, 0, args.max_new_tokens, seed=args.seed)


def read_train_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The `data` section of a resolved training config (pyyaml only: the eval image has no trainer deps)."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--train-config {path}: {e}")
    data = cfg.get("data") if isinstance(cfg, dict) else None
    return data if isinstance(data, dict) else {}


def env_url(args: argparse.Namespace) -> str | None:
    """--env-url, else ENV/ENV_PORT (ENV must be an env name: POSIX shells also use ENV for a startup file path)."""
    if args.env_url:
        return args.env_url.rstrip("/")
    name, port = env_var("ENV"), env_var("ENV_PORT")
    if port or (name and re.fullmatch(r"[A-Za-z0-9_-]+", name)):
        return f"http://{env_var('ENV_HOST', '127.0.0.1')}:{port or 36001}"
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "run"


def read_items(path: Path) -> dict[int, dict]:
    """Finished items by idx. A torn last line (the run was killed mid-write) is dropped and the file rewritten."""
    if not path.is_file():
        return {}
    done, good, torn = {}, [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            done.setdefault(int(record["idx"]), record)
            good.append(line)
        except (ValueError, KeyError, TypeError):
            torn = True
    if torn:
        write_atomic(path, "".join(line + "\n" for line in good))
    return done


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_resume(out_dir: Path, config: dict, overwrite: bool) -> None:
    """Resume only a run made with the same settings; --overwrite starts over."""
    saved = out_dir / "config.json"
    if overwrite:
        for name in ("items.jsonl", "results.json", "results.md", "config.json"):
            (out_dir / name).unlink(missing_ok=True)
    elif saved.is_file():
        old = json.loads(saved.read_text())
        changed = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
        if changed:
            raise EvalError(
                f"{out_dir} holds a run with other settings ({', '.join(changed)}): pass --overwrite or another --out-dir"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, json.dumps({k: config[k] for k in RESUME_KEYS}, indent=2) + "\n")


def item_result(fut: Future) -> dict:
    """The finished item, or the failure as an EvalError line (HTTP/env/engine errors: nothing to gain by a trace)."""
    import httpx

    from env_servers.api import EnvError
    from env_servers.client import EnvServerError

    try:
        return fut.result()
    except (EnvServerError, EnvError, httpx.HTTPError, OSError, ValueError) as e:
        raise EvalError(f"{type(e).__name__}: {e}; finished items are kept, rerun to resume") from e


def run_items(task, target, todo: list[int], s: SamplingParams, args, items_path: Path) -> None:
    """Evaluate `todo` with at most --concurrency items in flight; each finished item is appended to items.jsonl."""
    from tqdm import tqdm

    lock = threading.Lock()
    with ThreadPoolExecutor(args.concurrency, thread_name_prefix="eval") as pool, open(items_path, "a") as f:
        futures = [pool.submit(task.run, target, idx, s, args.success_threshold) for idx in todo]
        with tqdm(total=len(todo), desc="eval", unit="item") as bar:
            try:
                for fut in as_completed(futures):
                    record = item_result(fut)
                    with lock:
                        f.write(json.dumps(record) + "\n")
                        f.flush()
                    bar.update(1)
            except BaseException:
                for other in futures:
                    other.cancel()
                raise


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    url = env_url(args)
    task = EnvTask(url, args) if url else GSM8KTask(args)
    target = make_target(args)
    info = target.info()
    s = sampling(args)
    model = str(info.get("model") or args.model)
    prompt = [args.system_prompt, args.prompt_template or (None if url else PROMPT_TEMPLATE)]
    config = {**info, "model": model, "task": task.name, "k": args.k, "temperature": args.temperature,
              "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "max_round": args.max_round if url else None,
              "prompt": prompt, "seed": args.seed}  # fmt: skip
    out_dir = Path(args.out_dir or f"saves/eval/{slug(model)}__{slug(task.short)}")
    check_resume(out_dir, config, args.overwrite)
    items_path = out_dir / "items.jsonl"
    selected = list(range(len(task) if args.limit is None else min(args.limit, len(task))))
    done = read_items(items_path)
    todo = [i for i in selected if i not in done]
    if len(todo) < len(selected):
        print(f"resuming: {len(selected) - len(todo)} of {len(selected)} items already in {items_path}")
    started = time.monotonic()
    run_items(task, target, todo, s, args, items_path)
    records = [r for i, r in sorted(read_items(items_path).items()) if i in set(selected)]
    results = {
        "metrics": summarize(records, args.k),
        "config": config,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out_dir / "results.md", markdown(results))
    print(markdown(results) + f"\nwrote {out_dir}/results.json, results.md, items.jsonl")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except EvalError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eval: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
