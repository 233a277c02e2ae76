"""Rollout service costs on GPUs: weight sync (nccl broadcast, disk) trainer → `python -m rollout.server`, generation
through HTTP vs the same engine in-process, and a restart re-synced over a new group. Bit-identity is checked.

    python bench/rollout_service.py --model smollm2-135m-instruct --out bench_service.json

Two GPUs: the trainer uses cuda:0 and the service cuda:1 (NCCL). One GPU: both share it and only disk sync runs
(NCCL cannot join two ranks on one device). Prints one JSON object (also written to --out).
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
    p.add_argument("--out", default=None)
    return p.parse_args()


def start_server(args, path: str, gpu: int) -> subprocess.Popen:
    from tests.conftest import wait_http

    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rollout.server", "--model", path, "--device", "cuda", "--dtype", args.dtype]
    cmd += ["--port", str(args.port), "--max-batch-size", str(args.prompts)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{args.port}/health", 600, proc)
    return proc


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, round(time.perf_counter() - t, 3)


def tok_s(generate, prompts, params) -> float:
    out, dt = timed(generate, prompts, params)
    return round(sum(len(c.token_ids) for c in out) / dt, 1)


def main() -> None:
    args = parse_args()
    import torch

    from rollout.api import SamplingParams
    from rollout.client import HTTPRolloutClient
    from rollout.engine import EmbeddedEngine
    from rollout.loading import load_model, resolve_model_path
    from rollout.weight_transfer import checksum, unique_tensors
    from trainer.weight_sync import DiskSync, NcclSync

    path = resolve_model_path(args.model, ROOT / "models")
    dtype = getattr(torch, args.dtype)
    two = torch.cuda.device_count() >= 2
    proc = start_server(args, path, 1 if two else 0)
    url = f"http://127.0.0.1:{args.port}"
    client = HTTPRolloutClient([url], timeout=600, recovery_s=30)
    model = load_model(path, dtype=dtype, device="cuda:0")
    r: dict = {"gpus": torch.cuda.device_count(), "dtype": args.dtype}

    def step() -> str:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        return checksum(unique_tensors(model.state_dict()))

    r["param_bytes"] = sum(t.numel() * t.element_size() for _, t in unique_tensors(model.state_dict()))
    if two:
        nccl = NcclSync(client, backend="nccl")
        expected = step()
        _, r["nccl_first_push_s"] = timed(nccl.push, model, 1)  # includes forming the group
        _, r["nccl_push_s"] = timed(nccl.push, model, 2)
        r["nccl_bit_identical"] = client.weights_checksum(url) == expected
    expected = step()
    _, r["disk_push_s"] = timed(DiskSync(client, ROOT / "saves" / "bench_service" / "weights").push, model, 3)
    r["disk_bit_identical"] = client.weights_checksum(url) == expected

    prompts = [[1] + [100 + i] * 31 for i in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    client.generate(prompts[:4], SamplingParams(max_new_tokens=8))  # warm-up: kernels, graphs
    r["http_tok_s"] = max(tok_s(client.generate, prompts, params) for _ in range(2))
    engine = EmbeddedEngine(path, device="cuda:0", dtype=dtype, max_batch_size=args.prompts)
    engine.generate(prompts[:4], SamplingParams(max_new_tokens=8))
    r["inprocess_tok_s"] = max(tok_s(engine.generate, prompts, params) for _ in range(2))
    engine.close()

    if two:
        expected = step()
        nccl.push(model, 4)
        proc.terminate()
        proc.wait()
        proc, r["restart_s"] = timed(start_server, args, path, 1)
        out, r["resync_generate_s"] = timed(client.generate, prompts[:2], SamplingParams(max_new_tokens=4))
        r["resync_ok"] = {c.weight_version for c in out} == {4} and client.weights_checksum(url) == expected
        nccl.close()
    proc.terminate()
    proc.wait()
    print(json.dumps(r, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
