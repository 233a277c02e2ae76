"""What answers the eval's prompts: an OpenAI-compatible endpoint, an rldock rollout service, or the embedded engine
in this process (the only one that imports torch)."""

from __future__ import annotations

import argparse
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rollout.api import SamplingParams
from scripts.eval import EvalError, env_var


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

        async def generate(prompts, params, caps):
            return await self.loop.run_in_executor(engine_thread, self.engine.generate, prompts, params, caps)

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
        return OpenAITarget(args.openai_base_url, args.model, args.api, env_var("OPENAI_API_KEY"), args.timeout)
    if args.rollout_url:
        return RolloutTarget(args.rollout_url, args.api, args.timeout)
    if not args.model:
        raise EvalError("nothing to evaluate: pass --model PATH, --rollout-url URL or --openai-base-url URL")
    if args.api != "chat":
        raise EvalError("--api completions applies to HTTP endpoints; a local model always uses its chat template")
    return LocalTarget(args.model, args.device, args.concurrency * args.k)
