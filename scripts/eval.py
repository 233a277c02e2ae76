"""Evaluate a model on GSM8K or on an env server: accuracy, mean reward, avg@k and pass@k; resumable.

    python -m scripts.eval [--model M] [--openai-base-url URL | --rollout-url URL] [--data PATH | --env-url URL]
        [--k 4] [--limit 100] [--concurrency 8] [--out-dir DIR]

Target (the first that is set):
  --openai-base-url / OPENAI_BASE_URL  any OpenAI-compatible server (`.../v1`); --model/MODEL names the model,
                                       OPENAI_API_KEY the key; /v1/chat/completions, or /v1/completions (--api)
  --rollout-url / ROLLOUT_URL          an rldock rollout service (its OpenAI routes, with RLDOCK_API_KEY when set;
                                       model and weight version are read from its /health)
  otherwise                            --model/MODEL (HF folder, hub id or built-in name) runs in this process on
                                       the embedded engine: the only mode that imports torch
Task:
  --env-url / ENV_URL, or ENV [+ ENV_HOST, ENV_PORT] → http://ENV_HOST:ENV_PORT: multi-turn episodes on an env server
      (AgentGym protocol) of at most --max-round/MAX_ROUND model turns; reward = the sum of the step rewards
  otherwise --data: GSM8K JSONL (default data/gsm8k/test.jsonl) or a hub id, scored by env_servers.gsm8k.score
Each item gets --k samples. A sample is correct when the scorer (or the env's step info) says so, else when its
reward >= --success-threshold. pass@j uses the unbiased estimator 1 - C(n-c, j)/C(n, j) (Chen et al., 2021);
avg@k is the mean correctness of the k samples. Writes results.json, results.md and items.jsonl to --out-dir; a
rerun with the same settings skips the items already in items.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from env_servers.gsm8k import PROMPT_TEMPLATE
from rollout.api import SamplingParams

DEFAULT_DATA = "data/gsm8k/test.jsonl"
RESUME_KEYS = ("target", "model", "task", "k", "temperature", "top_p", "max_new_tokens", "max_round", "prompt")


class EvalError(Exception):
    """A problem the user can fix; printed as one line."""


# ---- arguments --------------------------------------------------------------------------------------------------


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.eval",
        description="Evaluate a model on GSM8K or an env server; reports accuracy, mean reward, avg@k, pass@k.",
    )
    t = p.add_argument_group("target")
    t.add_argument("--model", default=_env("MODEL"), help="local model path/id/built-in, or the served name (MODEL)")
    t.add_argument(
        "--openai-base-url", default=_env("OPENAI_BASE_URL"), help="OpenAI-compatible base, e.g. http://h:8000/v1"
    )
    t.add_argument("--rollout-url", default=_env("ROLLOUT_URL"), help="rldock rollout service, e.g. http://h:8000")
    t.add_argument("--api", choices=["chat", "completions"], default="chat", help="OpenAI route to use")
    t.add_argument("--device", default="auto", help="local model: auto, cpu, cuda or cuda:N")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    d = p.add_argument_group("task")
    d.add_argument("--data", default=DEFAULT_DATA, help="GSM8K JSONL file or hub id (openai/gsm8k)")
    d.add_argument("--split", default="test", help="split of a hub dataset")
    d.add_argument("--env-url", default=_env("ENV_URL"), help="env server URL (else ENV/ENV_HOST/ENV_PORT)")
    d.add_argument("--max-round", type=int, default=int(_env("MAX_ROUND", 20)), help="model turns per episode")
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
    name, port = _env("ENV"), _env("ENV_PORT")
    if port or (name and re.fullmatch(r"[A-Za-z0-9_-]+", name)):
        return f"http://{_env('ENV_HOST', '127.0.0.1')}:{port or 36001}"
    return None


# ---- metrics (pure) ---------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})


def summarize(records: list[dict], k: int) -> dict[str, Any]:
    """Aggregate per-item records (each with a `samples` list) into the reported metrics."""
    samples = [s for r in records for s in r["samples"]]
    if not samples:
        return {"items": 0, "samples": 0}
    out: dict[str, Any] = {
        "items": len(records),
        "samples": len(samples),
        "accuracy": sum(bool(s["correct"]) for s in samples) / len(samples),
        "mean_reward": sum(float(s["reward"]) for s in samples) / len(samples),
        f"avg@{k}": sum(sum(bool(s["correct"]) for s in r["samples"]) / len(r["samples"]) for r in records)
        / len(records),
    }
    for j in k_values(k):
        scored = [r for r in records if len(r["samples"]) >= j]
        out[f"pass@{j}"] = sum(
            pass_at_k(len(r["samples"]), sum(bool(s["correct"]) for s in r["samples"]), j) for r in scored
        ) / len(scored)
    for key in ("format_ok", "strict"):
        if all(key in s for s in samples):
            out[f"{key}_rate"] = sum(bool(s[key]) for s in samples) / len(samples)
    out["truncated_rate"] = sum(s.get("finish_reason") == "length" for s in samples) / len(samples)
    return out


def markdown(results: dict[str, Any]) -> str:
    """results.md: what was evaluated, then one row of metrics."""
    m = results["metrics"]
    keys = [key for key in m if key not in ("items", "samples")]
    cfg = results["config"]
    lines = [
        f"# Eval: {cfg['model']} on {cfg['task']}",
        "",
        f"target `{cfg['target']}`, k={cfg['k']}, temperature {cfg['temperature']}, top_p {cfg['top_p']}, "
        f"max_new_tokens {cfg['max_new_tokens']}; {m.get('items', 0)} items, {m.get('samples', 0)} samples",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(f"{m[key]:.4f}" for key in keys) + " |",
    ]
    return "\n".join(lines) + "\n"


# ---- targets ----------------------------------------------------------------------------------------------------


def _sampling_fields(model: str | None, s: SamplingParams) -> dict[str, Any]:
    body = {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_new_tokens}
    if model:
        body["model"] = model
    if s.seed is not None:
        body["seed"] = s.seed
    return body


def chat_body(model: str | None, messages: list[dict], s: SamplingParams) -> dict[str, Any]:
    return {"messages": messages, **_sampling_fields(model, s)}


def completions_body(model: str | None, prompt: str, s: SamplingParams) -> dict[str, Any]:
    return {"prompt": prompt, **_sampling_fields(model, s)}


def parse_choices(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """[{text, finish_reason}] from a chat or completions answer."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        raise EvalError(f"the endpoint answered without choices: {str(answer)[:200]}")
    out = []
    for c in sorted(choices, key=lambda c: c.get("index", 0)):
        text = c["message"].get("content") if "message" in c else c.get("text")
        out.append({"text": text or "", "finish_reason": c.get("finish_reason")})
    return out


def render_plain(messages: list[dict]) -> str:
    """A prompt for the legacy completions route: the turns' text (no chat template is available there)."""
    return "\n\n".join(m["content"] for m in messages)


class OpenAITarget:
    """/v1/chat/completions or /v1/completions; transport errors, 429 and 5xx are retried for up to `recovery_s`
    (rollout.recovery); other 4xx fail at once."""

    def __init__(self, base_url: str, model: str | None, api: str, api_key: str | None, timeout: float,
                 recovery_s: float = 30.0):  # fmt: skip
        import httpx

        from rollout.recovery import Recovery

        self.base_url, self.model, self.api = base_url.rstrip("/"), model, api
        self.recovery = Recovery(recovery_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.name = f"openai:{self.base_url}"

    def complete(self, messages: list[dict], s: SamplingParams) -> list[dict[str, Any]]:
        if self.api == "chat":
            return parse_choices(self.post("/chat/completions", chat_body(self.model, messages, s)))
        return parse_choices(self.post("/completions", completions_body(self.model, render_plain(messages), s)))

    def post(self, route: str, body: dict) -> dict:
        from rollout.recovery import http_attempt

        def busy(status: int) -> bool:
            return status == 429 or status >= 500

        attempt = http_attempt(lambda: self.http.post(self.base_url + route, json=body), retry_status=busy)
        r = self.recovery.run(f"{self.base_url}{route}", attempt, give_up=EvalError)
        if r.status_code >= 400:
            raise EvalError(f"{self.base_url}{route} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def info(self) -> dict[str, Any]:
        return {"target": self.name, "model": self.model}


class RolloutTarget(OpenAITarget):
    """The rldock rollout service through its OpenAI chat route; its /health names the model and weight version."""

    def __init__(self, url: str, api: str, timeout: float):
        from rollout.auth import API_KEY, token

        super().__init__(url.rstrip("/") + "/v1", None, api, token(API_KEY), timeout)  # the service's own key
        self.url = url.rstrip("/")
        self.name = f"rollout:{self.url}"
        try:
            self.health = self.http.get(self.url + "/health", timeout=10.0).json()
        except Exception as e:
            raise EvalError(f"rollout service {self.url} is not reachable ({type(e).__name__}: {e})") from None

    def info(self) -> dict[str, Any]:
        h = self.health
        return {"target": self.name, "model": h.get("model"), "weight_version": h.get("weight_version")}


class LocalTarget:
    """The embedded engine in this process behind the rollout service's batcher (rollout/batching.py), on a private
    event loop: the worker threads' concurrent calls share engine calls of at most --concurrency x k sequences."""

    def __init__(self, model: str, device: str, max_rows: int):
        import asyncio

        from rollout.batching import Batcher
        from rollout.factory import build_engine
        from rollout.loading import load_tokenizer, resolve_model_path

        path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(path)
        self.engine = build_engine(path, device=device, max_batch_size=max(8, max_rows))
        self.name, self.model = f"local:{self.engine.device}", model
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="eval-batcher", daemon=True).start()
        engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")  # one engine call at a time

        async def generate(prompts, params):
            return await self.loop.run_in_executor(engine_thread, self.engine.generate, prompts, params)

        self.batcher = Batcher(generate, max(8, max_rows))
        asyncio.run_coroutine_threadsafe(self.batcher.run_forever(), self.loop)

    def complete(self, messages: list[dict], s: SamplingParams) -> list[dict[str, Any]]:
        import asyncio

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]

        async def submit():
            return await self.batcher.submit([ids], s).future

        done = asyncio.run_coroutine_threadsafe(submit(), self.loop).result()
        return [{"text": self._decode(c.token_ids), "finish_reason": c.finish_reason} for c in done]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def info(self) -> dict[str, Any]:
        return {"target": self.name, "model": self.model}


def make_target(args: argparse.Namespace):
    if args.openai_base_url:
        if not args.model:
            raise EvalError("--openai-base-url needs --model (or MODEL): the name the endpoint serves")
        return OpenAITarget(args.openai_base_url, args.model, args.api, _env("OPENAI_API_KEY"), args.timeout)
    if args.rollout_url:
        return RolloutTarget(args.rollout_url, args.api, args.timeout)
    if not args.model:
        raise EvalError("nothing to evaluate: pass --model PATH, --rollout-url URL or --openai-base-url URL")
    if args.api != "chat":
        raise EvalError("--api completions applies to HTTP endpoints; a local model always uses its chat template")
    return LocalTarget(args.model, args.device, args.concurrency * args.k)


# ---- tasks ------------------------------------------------------------------------------------------------------


def _sample(choice: dict, scored: dict) -> dict[str, Any]:
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], **scored}


class GSM8KTask:
    """Questions from a GSM8K file or hub dataset; one request of n=k per item, each answer scored locally."""

    def __init__(self, args: argparse.Namespace):
        self.rows = load_rows(args.data, args.split)
        self.template = args.prompt_template or PROMPT_TEMPLATE
        self.system = args.system_prompt
        local = Path(args.data).expanduser().exists()
        self.name = f"gsm8k:{args.data}" + ("" if local else f":{args.split}")
        self.short = "gsm8k_" + (Path(args.data).stem if local else f"{args.data}_{args.split}")

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self, question: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.template.format(question=question)}]

    def run(self, target, idx: int, s: SamplingParams, threshold: float) -> dict[str, Any]:
        from env_servers.gsm8k import gold_answer, score

        row = self.rows[idx]
        choices: list[dict] = []
        while len(choices) < s.n:  # some endpoints return fewer choices than n
            got = target.complete(self.messages(row["question"]), replace(s, n=s.n - len(choices)))
            if not got:
                raise EvalError(f"item {idx}: the endpoint returned no completion")
            choices += got
        samples = [_sample(c, score(c["text"], row["answer"])) for c in choices[: s.n]]
        return {"idx": idx, "question": row["question"], "gold": gold_answer(row["answer"]), "samples": samples}


def load_rows(data: str, split: str) -> list[dict[str, str]]:
    """GSM8K rows from a local JSONL file/folder, or from the hub through `datasets` (not in the slim eval image)."""
    from env_servers.gsm8k import load_gsm8k

    path = Path(data).expanduser()
    if path.exists():
        try:
            return load_gsm8k(path, split)
        except (OSError, ValueError) as e:
            raise EvalError(str(e)) from None
    if data.count("/") != 1 or path.suffix:
        raise EvalError(f"--data {data}: no such file, and not a hub id like openai/gsm8k")
    try:
        import datasets
    except ImportError:
        raise EvalError(
            f"--data {data} is a hub id, which needs `pip install datasets`; or pass a JSONL file"
        ) from None
    try:
        rows = datasets.load_dataset(data, "main", split=split)
    except Exception as e:
        raise EvalError(f"cannot load {data} ({split}) from the hub: {type(e).__name__}: {e}") from None
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


class EnvTask:
    """Episodes on an env server: observation → model turn → env step, until done or max_round turns."""

    def __init__(self, url: str, args: argparse.Namespace):
        from env_servers.client import EnvClient
        from rollout.auth import env_token

        self.client, self.max_round = EnvClient(url, timeout=args.timeout, token=env_token()), args.max_round
        self.system, self.template = args.system_prompt, args.prompt_template or "{question}"
        try:
            health = self.client.health()
            if health.get("size") is None:  # rldock servers learn the size when their first env is built
                self.client.close(self.client.create())
                health = self.client.health()
        except Exception as e:
            raise EvalError(f"env server {url} is not usable: {e}") from None
        if health.get("size") is None:
            raise EvalError(f"env server {url} does not report its dataset size in /health")
        from env_servers.agents import spec_of

        self.spec = spec_of(health.get("env", ""))
        self.size, self.short = int(health["size"]), f"env_{health.get('env', 'unknown')}"
        self.name = f"env:{health.get('env', 'unknown')}@{url}"

    def __len__(self) -> int:
        return self.size

    def run(self, target, idx: int, s: SamplingParams, threshold: float) -> dict[str, Any]:
        episodes = [self.episode(target, idx, replace(s, n=1)) for _ in range(s.n)]
        samples = [self.judge(sample, threshold) for _, sample in episodes]
        return {"idx": idx, "question": episodes[0][0], "samples": samples}

    @staticmethod
    def judge(sample: dict, threshold: float) -> dict:
        """Correct: the env's own verdict on the last step when it gives one, else reward >= threshold."""
        info = sample.pop("info")
        sample["correct"] = bool(info["correct"]) if "correct" in info else sample["reward"] >= threshold
        sample.update({k: info[k] for k in ("format_ok", "strict") if k in info})
        return sample

    def episode(self, target, idx: int, s: SamplingParams) -> tuple[str, dict]:
        """(task text, sample) of one episode on a fresh env slot, closed afterwards."""
        from env_servers.agents import NoAction, first_prompt
        from env_servers.api import EnvError

        env_id = self.client.create()
        sample = {"reward": 0.0, "finish_reason": None, "turns": [], "done": False, "error": None, "info": {}}
        try:
            first = self.client.reset(env_id, idx)
            task = first_prompt(self.spec, first["observation"], first)
            messages = [{"role": "system", "content": self.system}] if self.system else []
            if self.spec.instructions:  # AgentGym's opening turns (env_servers.agents)
                messages += [{"role": "user", "content": self.spec.instructions},
                             {"role": "assistant", "content": self.spec.ack}]  # fmt: skip
            messages.append({"role": "user", "content": self.template.format(question=task)})
            for _ in range(self.max_round):
                choice = target.complete(messages, s)[0]
                sample["finish_reason"] = choice["finish_reason"]
                try:
                    step = self.client.step(env_id, self.spec.to_action(choice["text"]))
                except NoAction as refusal:  # AgentGym's client answers this itself
                    step = {"observation": str(refusal), "reward": 0.0, "score": None, "done": False, "info": {}}
                except EnvError as e:  # the env refused the action: the episode ends there, unrewarded
                    sample["error"] = str(e)
                    break
                scale = self.spec.score_scale
                score = step["score"]
                sample["reward"] = score / scale if score is not None else sample["reward"] + step["reward"] / scale
                sample["info"], sample["done"] = step["info"], step["done"]
                sample["turns"].append(
                    {"action": choice["text"], "observation": step["observation"], "reward": step["reward"]}
                )
                if step["done"]:
                    break
                messages += [
                    {"role": "assistant", "content": choice["text"]},
                    {"role": "user", "content": step["observation"]},
                ]
        finally:
            self.client.close(env_id)
        return task, sample


# ---- the run ----------------------------------------------------------------------------------------------------


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
