"""Rollout service costs and correctness on GPUs, for either backend: weight sync (nccl broadcast, disk) trainer →
`python -m rollout.server`, what each push does to the service's greedy output, the OpenAI client and /generate
answering, generation through HTTP vs the same engine in-process, and a restart re-synced over a new group.

    python bench/rollout_service.py --model smollm2-135m-instruct [--backend vllm] --out bench_service.json

Two GPUs: the trainer uses cuda:0 and the service cuda:1 (weights go by NCCL, and by disk once). One GPU: both share
it and only disk sync runs (NCCL cannot join two ranks on one device). Each push is checked three ways: the
service's checksum equals the trainer's (`checksum(unique_tensors(state_dict))`), perturbed weights change the greedy
output, and the original weights pushed back give the first greedy output again token for token; weights with a zero
final norm make every logit 0, so greedy decoding must answer token 0 only. Prints one JSON object (also --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--backend", default="embedded", choices=["embedded", "vllm"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vllm: share of the service's GPU")
    p.add_argument("--skip-restart", action="store_true", help="two GPUs: leave out the restart and re-sync")
    p.add_argument("--server-log", default=None, help="the service's output goes here (default: discarded)")
    p.add_argument("--out", default=None)
    return p.parse_args()


def start_server(args, path: str, gpu: int) -> subprocess.Popen:
    from tests.conftest import wait_http

    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rollout.server", "--model", path, "--device", "cuda", "--dtype", args.dtype]
    cmd += ["--port", str(args.port), "--max-batch-size", str(args.prompts), "--backend", args.backend]
    cmd += ["--log-level", "info" if args.server_log else "warning"]
    if args.backend == "vllm":
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{args.port}/health", 900, proc)
    return proc


def stage(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, round(time.perf_counter() - t, 3)


def tok_s(generate, prompts, params) -> float:
    out, dt = timed(generate, prompts, params)
    return round(sum(len(c.token_ids) for c in out) / dt, 1)


def greedy(client, prompts) -> list[list[int]]:
    from rollout.api import SamplingParams

    return [c.token_ids for c in client.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0))]


def openai_answers(url: str) -> dict:
    """The OpenAI client against the service: the served model's name, a completion and a chat completion."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = api.models.list().data[0].id
    text = api.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    return {"completion": text.choices[0].text, "chat": chat.choices[0].message.content}


def check_pushes(r: dict, sync, client, url: str, model, kind: str) -> None:
    """Three pushes through `sync`, each checked by checksum and by its greedy output (module docstring)."""
    import torch

    from rollout.weight_transfer import checksum, unique_tensors

    def digest() -> str:
        return checksum(unique_tensors(model.state_dict()))

    prompts = [[1, 504, 3458, 282], [1, 2683, 314]]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    stage(f"{kind}: greedy output at the first weights")
    base = greedy(client, prompts)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    stage(f"{kind}: push perturbed weights")
    _, r[f"{kind}_first_push_s"] = timed(sync.push, model, 1)  # nccl: includes forming the group
    stage(f"{kind}: pushed; checksum and greedy output")
    r[f"{kind}_bit_identical"] = client.weights_checksum(url) == digest()
    r[f"{kind}_perturbed_output_changed"] = greedy(client, prompts) != base
    with torch.no_grad():
        model.model.norm.weight.zero_()
    stage(f"{kind}: push zero-norm weights")
    sync.push(model, 2)
    r[f"{kind}_zero_norm_gives_token_0"] = {t for ids in greedy(client, prompts) for t in ids} == {0}
    model.load_state_dict(original)
    stage(f"{kind}: push the first weights back")
    _, r[f"{kind}_push_s"] = timed(sync.push, model, 3)
    r[f"{kind}_restored_checksum"] = client.weights_checksum(url) == digest()
    r[f"{kind}_restored_output_equal"] = greedy(client, prompts) == base


def main() -> None:
    args = parse_args()
    import torch

    from rollout.loading import resolve_model_path

    path = resolve_model_path(args.model, ROOT / "models")
    dtype = getattr(torch, args.dtype)
    two = torch.cuda.device_count() >= 2
    r: dict = {"gpus": torch.cuda.device_count(), "dtype": args.dtype, "backend": args.backend}
    service, r["service_start_s"] = timed(start_server, args, path, 1 if two else 0)
    services = [service]  # a restart appends the new process: every one is stopped, whatever fails
    try:
        run_checks(args, r, services, path, dtype, two)
        print(json.dumps(r, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=1))
    finally:
        stage("stopping the service")
        for proc in services:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    from tests.conftest import stop_server

    stop_server(proc, timeout=60)  # vLLM's engine process can take its time


def run_checks(args, r: dict, services: list, path: str, dtype, two: bool) -> None:
    from rollout.api import SamplingParams
    from rollout.client import HTTPRolloutClient
    from rollout.engine import EmbeddedEngine
    from rollout.loading import load_model
    from rollout.weight_transfer import checksum, unique_tensors
    from trainer.weight_sync import DiskSync, NcclSync

    url = f"http://127.0.0.1:{args.port}"
    client = HTTPRolloutClient([url], timeout=600, recovery_s=30)
    model = load_model(path, dtype=dtype, device="cuda:0")
    r["param_bytes"] = sum(t.numel() * t.element_size() for _, t in unique_tensors(model.state_dict()))
    stage("OpenAI client")
    r["openai"] = openai_answers(url)
    r["generate_ok"] = all(len(ids) > 0 for ids in greedy(client, [[1, 2, 3]]))
    if two:
        nccl = NcclSync(client, backend="nccl")
        check_pushes(r, nccl, client, url, model, "nccl")
    check_pushes(r, DiskSync(client, ROOT / "saves" / "bench_service" / "weights"), client, url, model, "disk")

    stage("generation speed")
    prompts = [[1] + [100 + i] * 31 for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    client.generate(prompts[:4], SamplingParams(max_new_tokens=8))  # warm-up: kernels, graphs
    r["http_tok_s"] = max(tok_s(client.generate, prompts, params) for _ in range(2))
    if args.backend == "embedded":
        engine = EmbeddedEngine(path, device="cuda:0", dtype=dtype, max_batch_size=args.prompts)
        engine.generate(prompts[:4], SamplingParams(max_new_tokens=8))
        r["inprocess_tok_s"] = max(tok_s(engine.generate, prompts, params) for _ in range(2))
        engine.close()

    print(json.dumps(r), flush=True)  # what is known so far, should the restart hang
    if two and not args.skip_restart:
        stage("restart and re-sync")
        nccl.push(model, 4)
        expected = checksum(unique_tensors(model.state_dict()))
        stop(services[0])
        restarted, r["restart_s"] = timed(start_server, args, path, 1)
        services.append(restarted)
        out, r["resync_generate_s"] = timed(client.generate, prompts[:2], SamplingParams(max_new_tokens=4))
        r["resync_ok"] = {c.weight_version for c in out} == {4} and client.weights_checksum(url) == expected
        stage("closing the weight-sync group")
        nccl.close()


if __name__ == "__main__":
    main()
