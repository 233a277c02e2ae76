"""Long-run memory: thousands of env create/reset/step/close cycles, and rollout requests, from well-behaved clients
and from a leaking one (it opens a connection per request and never closes it, and leaves envs open). Each server's
resident memory after the run stays within SOAK_BOUND_MB of what it held after a warm-up of the same traffic
(AgentGym's WebShop server grows without bound for want of idle-env eviction and per-request cleanup)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.slow
SOAK_BOUND_MB = 25.0


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def growth(proc, traffic, warmup: int, soak: int) -> tuple[float, float]:
    """RSS (MB) after `warmup` units of traffic and after `soak` more; the leaked clients are closed at the end."""
    leaks: list[httpx.Client] = []
    try:
        traffic(warmup, leaks)
        warm = rss_mb(proc.pid)
        traffic(soak, leaks)
        return warm, rss_mb(proc.pid)
    finally:
        for c in leaks:
            c.close()


def env_cycles(url: str, count: int, leaks: list[httpx.Client]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(count):
            env_id = client.post("/create").json()["id"]
            client.post("/reset", json={"id": env_id, "data_idx": i % 50})
            client.post("/step", json={"id": env_id, "action": f"\\boxed{{{i}}}"})
            client.post("/close", json={"id": env_id})
            if i % 10 == 0:  # the leaking client: its own connection, an env it never closes
                leak = httpx.Client(base_url=url, timeout=30)
                leak.post("/create")
                leaks.append(leak)


def test_env_server_memory_stays_flat(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "env_servers", "--env", "gsm8k", "--port", str(port), "--ttl", "2", "--max-envs", "512"]
    proc = start_server(args, url + "/health", tmp_path / "env.log", 60)
    try:
        warm, end = growth(proc, lambda count, leaks: env_cycles(url, count, leaks), 500, 2500)
        live = httpx.get(url + "/health").json()["live"]
    finally:
        stop_server(proc)
    print(f"env server RSS: {warm:.1f} MB after 500 cycles, {end:.1f} MB after 3000 (300 leaked clients)")
    assert end - warm < SOAK_BOUND_MB, f"grew {end - warm:.1f} MB over 2500 cycles"
    assert live < 60, f"{live} envs still live: idle envs were not evicted"


def test_rollout_service_memory_stays_flat(model_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "rollout.server", "--model", model_path, "--port", str(port), "--threads", "1"]
    proc = start_server(args, url + "/health", tmp_path / "rollout.log")
    body = {"prompts": [[1, 2, 3]], "max_new_tokens": 1, "n": 2}

    def requests(count: int, leaks: list[httpx.Client]) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(count):
                assert client.post("/generate", json=body).status_code == 200
                if i % 5 == 0:
                    leak = httpx.Client(base_url=url, timeout=60)
                    leak.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                    leaks.append(leak)

    try:
        warm, end = growth(proc, requests, 150, 600)
    finally:
        stop_server(proc)
    print(f"rollout service RSS: {warm:.1f} MB after 150 requests, {end:.1f} MB after 750 (150 leaked)")
    assert end - warm < SOAK_BOUND_MB, f"grew {end - warm:.1f} MB over 600 requests"
