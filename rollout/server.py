"""The rollout service: any RolloutEngine behind HTTP. `python -m rollout.server --model PATH --backend embedded`.

Routes (bodies in rollout/payloads.py):
  GET  /health             200 {"status", "boot_id", "weight_version", "paused", "model", "backend", "sync_ranks"}
  GET  /v1/models          OpenAI model list
  POST /v1/completions     OpenAI legacy completions (prompt: string, strings, token ids or lists of them)
  POST /v1/chat/completions  OpenAI chat completions (the model's chat template renders the messages)
  POST /generate           token ids in → completions with token ids, logprobs, finish reason and weight version
  POST /update_weights     {"path", "version"} loads an HF safetensors folder; {"method": "nccl", ...} receives a
                           broadcast in the group opened by POST /init_weight_sync (closed by /close_weight_sync)
  POST /pause, /resume     pause: queued and new generation requests WAIT (they are not refused) until /resume;
                           /pause returns once the generation in flight has finished, so the engine is idle
  GET  /metrics            JSON counters: requests, tokens, tok/s, queue, weight version, ...
  GET  /weights_checksum   sha256 over the engine's weights (bit-identity checks of weight sync)

One engine thread runs every engine call (generation, weight loads, group joins) in order, so a generation never
sees two weight versions and each answer carries the version that produced all of its tokens. Concurrent /generate
and /v1/completions requests with identical unseeded sampling parameters are merged into one engine call of at most
--max-batch-size sequences. Bad input answers 4xx with a message; the process never dies of a request.

Bounded (Limits): n, max tokens, sequences and tokens per request have caps (400 naming the field). A request larger
than one engine call is cut into calls of --max-batch-size sequences, and the batcher serves the queue round-robin
between them, so no request waits behind another for more than one engine call. A request whose client has gone is
dropped before its next engine call. SIGTERM answers every queued and in-flight request 503 at once and exits within
seconds (an engine call still running is not waited for). Tokens (rollout/auth.py) guard the routes; disk weight
loads only read folders under --weights-root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rollout import auth
from rollout import payloads as P
from rollout.api import Completion, SamplingParams, ServedEngine
from rollout.batching import Batcher
from rollout.factory import build_engine, model_limits
from rollout.openai_api import openai_body, render_chat, tokenize

SHUTTING_DOWN = "the rollout service is shutting down: send the request again once it is back"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (command-line flags of the same names); the model's own limits come on top."""

    max_n: int = 64
    max_tokens: int = 4096
    max_sequences: int = 1024  # prompts x n
    max_request_tokens: int = 2**21  # sum over sequences of prompt + max_new_tokens: the KV work a request may queue


@dataclass
class Metrics:
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    tokens_generated: int = 0
    engine_calls: int = 0
    generate_seconds: float = 0.0
    last_call_tok_s: float = 0.0
    weight_updates: int = 0
    last_update_seconds: float = 0.0
    cancelled: int = 0


class Service:
    """The engine, its single engine thread, the batcher and the counters behind the routes."""

    def __init__(
        self, engine: ServedEngine, tokenizer: Any, name: str, backend: str, limits: tuple[int, int], caps: Limits
    ):
        self.engine, self.tokenizer, self.name, self.backend, self.caps = engine, tokenizer, name, backend, caps
        self.vocab_size, self.max_len = limits
        self.closing = False
        self.busy = False  # an engine call is running on the engine thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self.boot_id = uuid.uuid4().hex
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.batcher: Batcher | None = None  # made inside the event loop

    async def call(self, fn, *args):
        """Run fn on the engine thread (all engine calls go through here, in order)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def timed_generate(
        self, prompts: list[list[int]], params: SamplingParams, caps: list[int] | None = None
    ) -> list[Completion]:
        t0 = time.perf_counter()
        self.busy = True
        try:
            out = self.engine.generate(prompts, params, caps)
        finally:
            self.busy = False
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in out)
        m = self.metrics
        m.engine_calls += 1
        m.generate_seconds += dt
        m.tokens_generated += tokens
        m.completions += len(out)
        m.last_call_tok_s = tokens / dt if dt > 0 else 0.0
        return out

    def timed_update(self, fn, *args) -> int:
        t0 = time.perf_counter()
        version = fn(*args)
        self.metrics.weight_updates += 1
        self.metrics.last_update_seconds = time.perf_counter() - t0
        return version

    def check_size(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Refuse (400, naming the field) a request above this service's caps (Limits)."""
        c, sequences = self.caps, len(prompts) * params.n
        for field_name, value, cap, flag in (
            ("n", params.n, c.max_n, "--max-n"),
            ("max_tokens", params.max_new_tokens, c.max_tokens, "--max-tokens"),
            ("prompts x n", sequences, c.max_sequences, "--max-sequences"),
            ("tokens (prompt + max_tokens, summed)", params.n * sum(len(p) + params.max_new_tokens for p in prompts),
             c.max_request_tokens, "--max-request-tokens"),
        ):  # fmt: skip
            if value > cap:
                raise HTTPException(400, f"{field_name}: {value} is above this service's limit of {cap} ({flag})")

    def check_ids(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Refuse (400) what the engine would refuse, before a bad request can be merged with good ones."""
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if t >= self.vocab_size]
            if bad:
                raise HTTPException(
                    400, f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
            if len(prompt) + params.max_new_tokens > self.max_len:
                raise HTTPException(
                    400,
                    f"prompt {i}: {len(prompt)} prompt tokens + max_new_tokens {params.max_new_tokens} exceed the "
                    f"model's {self.max_len} positions",
                )
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise HTTPException(400, f"stop token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    async def generate(self, prompts: list[list[int]], params: SamplingParams, request: Request) -> list[Completion]:
        if self.closing:
            raise HTTPException(503, SHUTTING_DOWN)
        self.check_size(prompts, params)
        self.check_ids(prompts, params)
        self.metrics.requests += 1
        self.metrics.prompt_tokens += sum(len(p) for p in prompts)
        job = self.batcher.submit(prompts, params)
        gone = asyncio.create_task(_client_gone(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():  # the client went away: its remaining engine calls are not made
            job.future.cancel()
            self.metrics.cancelled += 1
            raise HTTPException(499, "client closed the request")
        try:
            return job.future.result()
        except ValueError as err:  # the engine refused the input (its own limits): the caller's to fix
            raise HTTPException(400, str(err)) from None

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests and answer every queued and in-flight one 503 now."""
        self.closing = True
        if self.batcher is not None:
            self.batcher.fail_all(HTTPException(503, SHUTTING_DOWN))

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "rldock", "max_model_len": self.max_len}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "boot_id": self.boot_id,
            "weight_version": self.engine.weight_version,
            "paused": not self.batcher.running.is_set(),
            "model": self.name,
            "backend": self.backend,
            "sync_ranks": self.engine.sync_ranks,
        }

    def metrics_body(self) -> dict[str, Any]:
        m = self.metrics
        body = {k: v for k, v in vars(m).items() if k != "started"}
        body.update(
            merged_requests=self.batcher.merged_requests,
            uptime_s=time.monotonic() - m.started,
            tokens_per_s=m.tokens_generated / m.generate_seconds if m.generate_seconds else 0.0,
            queue_requests=len(self.batcher.queue),
            queue_sequences=sum(j.size for j in self.batcher.queue),
            in_flight_sequences=self.batcher.in_flight,
            weight_version=self.engine.weight_version,
            paused=not self.batcher.running.is_set(),
            boot_id=self.boot_id,
        )
        return body

    def checksum(self) -> dict[str, Any]:
        return {"checksum": self.engine.weights_checksum(), "weight_version": self.engine.weight_version}


async def _client_gone(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


# ---- the app -------------------------------------------------------------------------------------------------------


def _generation_routes(app: FastAPI, svc: Service, users: Depends) -> None:
    @app.get("/health")
    async def health():
        return svc.health()

    @app.get("/v1/models", dependencies=[users])
    async def models():
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[users])
    async def model(model_id: str):
        if model_id != svc.name:
            raise HTTPException(404, f"model {model_id!r} is not served here; this service serves {svc.name!r}")
        return svc.model_card()

    @app.post("/generate", dependencies=[users])
    async def generate(req: P.GenerateRequest, request: Request):
        completions = await svc.generate(req.prompts, req.sampling_params(), request)
        # plain JSON types already: skip FastAPI's recursive jsonable_encoder (tens of ms on big batches)
        return JSONResponse(P.generate_response(completions, svc.boot_id))

    @app.post("/v1/completions", dependencies=[users])
    async def completions(req: P.CompletionsRequest, request: Request):
        return await _openai(svc, req, tokenize(svc.tokenizer, req), 16, request)

    @app.post("/v1/chat/completions", dependencies=[users])
    async def chat_completions(req: P.ChatCompletionsRequest, request: Request):
        return await _openai(svc, req, [render_chat(svc.tokenizer, req)], 512, request)


async def _openai(
    svc: Service, req: P.OpenAISampling, prompts: list[list[int]], default_max_tokens: int, request: Request
):
    if req.model not in (None, svc.name):
        raise HTTPException(404, f"model {req.model!r} is not served here; this service serves {svc.name!r}")
    refused = req.refused_field()
    if refused:
        raise HTTPException(400, refused)
    out = await svc.generate(prompts, req.sampling_params(default_max_tokens), request)
    body, parts = await asyncio.to_thread(openai_body, svc.tokenizer, svc.name, req, prompts, out)
    if not req.stream:
        return body
    # The engine answers a request whole; the stream hands it over token by token once it is done.
    usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(iter(P.stream_events(body, parts, usage)), media_type="text/event-stream")


def _admin_routes(app: FastAPI, svc: Service, admins: Depends, weights_root: Path) -> None:
    @app.post("/update_weights", dependencies=[admins])
    async def update_weights(req: P.UpdateWeightsRequest):
        if req.method == "disk":
            version = await _load_from_disk(svc, req, weights_root)
        else:
            manifest = [s.model_dump() for s in req.manifest]
            fn = svc.engine.receive_weights
            version = await svc.call(svc.timed_update, fn, manifest, req.bucket_bytes, req.version)
        return {"weight_version": version, "boot_id": svc.boot_id}

    @app.post("/init_weight_sync", dependencies=[admins])
    async def init_weight_sync(req: P.InitWeightSyncRequest):
        args = (req.host, req.port, req.rank_offset, req.world_size, req.backend, req.timeout_s)
        await svc.call(svc.engine.init_weight_sync, *args)
        return {"ok": True, "sync_ranks": svc.engine.sync_ranks}

    @app.post("/close_weight_sync", dependencies=[admins])
    async def close_weight_sync():
        await svc.call(svc.engine.close_weight_sync)
        return {"ok": True}

    @app.post("/pause", dependencies=[admins])
    async def pause():
        svc.batcher.running.clear()
        await svc.batcher.idle.wait()
        return {"paused": True, "queue_requests": len(svc.batcher.queue)}

    @app.post("/resume", dependencies=[admins])
    async def resume():
        svc.batcher.running.set()
        return {"paused": False}

    @app.get("/metrics")
    async def metrics():
        return svc.metrics_body()

    @app.get("/weights_checksum", dependencies=[admins])
    async def weights_checksum():
        return await svc.call(svc.checksum)


def _inside(root: Path, path: Path) -> bool:
    """`path` and every file in it resolve (symlinks and `..` followed) to somewhere under `root`."""
    try:
        targets = [path.resolve(strict=True), *(p.resolve(strict=True) for p in path.iterdir())]
    except OSError:
        return True  # does not exist: the 400 below says so
    return all(t.is_relative_to(root) for t in targets)


async def _load_from_disk(svc: Service, req: P.UpdateWeightsRequest, weights_root: Path) -> int:
    folder = Path(req.path)
    if not _inside(weights_root, folder):
        raise HTTPException(
            403, f"path: {req.path} is outside this service's weights root {weights_root} (--weights-root)"
        )
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise HTTPException(
            400, f"{req.path} is not a folder with *.safetensors on this service (is the volume shared?)"
        )
    try:
        return await svc.call(svc.timed_update, svc.engine.update_weights, str(folder), req.version)
    except (ValueError, KeyError, OSError, RuntimeError) as err:  # a wrong or broken checkpoint, not a server bug
        raise HTTPException(400, f"could not load weights from {req.path}: {err}") from None


def create_app(
    engine: ServedEngine,
    tokenizer: Any,
    *,
    name: str,
    backend: str = "embedded",
    max_batch_size: int = 64,
    limits: tuple[int, int] = (2**31 - 1, 2**31 - 1),
    caps: Limits = Limits(),
    weights_root: str | Path = "saves",
) -> FastAPI:
    """The FastAPI app over `engine`. limits = (vocab size, max positions), checked before anything reaches the
    engine, with the request caps; tokens come from the environment (rollout/auth.py). The engine is closed when the
    app shuts down, unless an engine call is still running then (main() exits without waiting for it)."""
    svc = Service(engine, tokenizer, name, backend, limits, caps)
    key, admin = auth.token(auth.API_KEY), auth.token(auth.ADMIN_TOKEN)
    # Generation is open unless RLDOCK_API_KEY is set; then the key or the admin token (the trainer's) opens it.
    users = Depends(auth.require((auth.API_KEY, key), (auth.ADMIN_TOKEN, admin)) if key else auth.require())
    admins = Depends(auth.require((auth.ADMIN_TOKEN, admin)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.loop = asyncio.get_running_loop()
        svc.batcher = Batcher(
            lambda prompts, params, caps: svc.call(svc.timed_generate, prompts, params, caps), max_batch_size
        )
        task = asyncio.create_task(svc.batcher.run_forever())
        yield
        svc.begin_shutdown()
        task.cancel()
        if not svc.busy:
            svc.executor.submit(engine.close)
        svc.executor.shutdown(wait=not svc.busy, cancel_futures=True)

    app = FastAPI(title="rldock rollout service", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(P.WeightSyncError)
    async def _out_of_order(request: Request, err: P.WeightSyncError):
        return JSONResponse({"detail": str(err)}, status_code=409)

    _generation_routes(app, svc, users)
    _admin_routes(app, svc, admins, Path(weights_root).resolve())
    return app


# ---- command line --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rollout.server", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF folder, hub id or built-in name")
    p.add_argument("--backend", choices=["embedded", "vllm"], default="embedded")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--max-batch-size", type=int, default=64, help="most sequences decoded at once")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the --model value)")
    p.add_argument("--models-dir", default="models", help="where built-in models are converted to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: share of GPU memory to take")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model copy")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    d = Limits()
    p.add_argument("--max-n", type=int, default=d.max_n, help="most samples per prompt in one request")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most new tokens per sample")
    p.add_argument("--max-sequences", type=int, default=d.max_sequences, help="most prompts x n in one request")
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                   help="most tokens (prompt + max_tokens, summed over sequences) in one request")  # fmt: skip
    p.add_argument("--weights-root", default=os.environ.get("RLDOCK_WEIGHTS_ROOT", "saves"),
                   help="disk weight updates read only folders under this one (env RLDOCK_WEIGHTS_ROOT)")  # fmt: skip
    args = p.parse_args(argv)
    if min(args.max_n, args.max_tokens, args.max_sequences, args.max_request_tokens) < 1:
        p.error("--max-n, --max-tokens, --max-sequences and --max-request-tokens must be >= 1")
    if args.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1")
    if not 0 < args.port < 65536:
        p.error("--port must be in 1..65535")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.backend == "vllm":
            from rollout.vllm_backend import require_vllm

            require_vllm()
        from rollout.loading import load_tokenizer, resolve_model_path

        path = resolve_model_path(args.model, args.models_dir)
        tokenizer = load_tokenizer(path)
        vllm = {
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "tensor_parallel_size": args.tensor_parallel_size,
        }
        engine = build_engine(path, args.backend, args.device, args.dtype, args.max_batch_size, args.seed, args.threads,
                              **(vllm if args.backend == "vllm" else {}))  # fmt: skip
    except (ValueError, OSError, ImportError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        sys.exit(f"rollout.server: error: {msg}")
    import uvicorn

    name = args.served_model_name or args.model
    caps = Limits(args.max_n, args.max_tokens, args.max_sequences, args.max_request_tokens)
    app = create_app(
        engine, tokenizer, name=name, backend=args.backend, max_batch_size=args.max_batch_size, limits=model_limits(path),
        caps=caps, weights_root=args.weights_root,
    )  # fmt: skip
    print(f"rollout.server: {name} ({args.backend}) on http://{args.host}:{args.port}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    _server(config).run()
    if app.state.service.busy:  # a long engine call would hold the exit (and the GPU) until it ends
        print("rollout.server: stopped; the engine call in flight was not waited for", flush=True)
        os._exit(0)


def _server(config):
    """uvicorn's server, told about SIGTERM/SIGINT first so queued and in-flight requests get their 503 at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            svc = config.app.state.service
            if svc.loop is not None:
                svc.loop.call_soon_threadsafe(svc.begin_shutdown)
            super().handle_exit(sig, frame)

    return Server(config)


if __name__ == "__main__":
    main()
