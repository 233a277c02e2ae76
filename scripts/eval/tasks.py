"""What the eval asks: GSM8K items scored by the GSM8K reward, or episodes on an env server."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from env_servers.gsm8k import PROMPT_TEMPLATE
from rollout.api import SamplingParams
from scripts.eval import EvalError


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
