"""The rollout service's bounds, measured on a real `python -m rollout.server` (DOCS.md, "Reliability and access"):

- fairness: how long a 1-sequence request waits when it arrives while a large request (several engine calls) runs;
- cancellation: how soon the service notices that a caller of a large request has gone (`cancelled` in /metrics);
- shutdown: SIGTERM to process exit, and what the in-flight request is answered.

    python bench/service_bounds.py [--model models/smollm2-135m-instruct] [--threads 2] [--batch 64] [--tokens 256]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the service")
    p.add_argument("--batch", type=int, default=64, help="the service's --max-batch-size (sequences per engine call)")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per sequence of the large request")
    p.add_argument("--calls", type=int, default=4, help="engine calls the large request takes")
    p.add_argument("--log", default="/tmp/service_bounds.log", help="the service's output")
    return p.parse_args()


def wait_for(pred) -> None:
    while not pred():
        time.sleep(0.05)


def main() -> None:
    import httpx

    from tests.conftest import free_port, start_server

    args = parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["-m", "rollout.server", "--model", args.model, "--port", str(port), "--threads", str(args.threads)]
    proc = start_server([*cmd, "--max-batch-size", str(args.batch)], url + "/health", Path(args.log), 300)
    big = {"prompts": [[1, 3]] * (args.calls * args.batch // 8), "n": 8, "max_new_tokens": args.tokens}
    metrics = lambda: httpx.get(url + "/metrics", timeout=30).json()  # noqa: E731
    answered: dict[str, tuple[int, float]] = {}

    def send_big():
        r = httpx.post(url + "/generate", json=big, timeout=3600)
        answered["big"] = (r.status_code, time.monotonic())

    worker = threading.Thread(target=send_big)
    worker.start()
    wait_for(lambda: metrics()["in_flight_sequences"] > 0)
    t0 = time.monotonic()
    httpx.post(url + "/generate", json={"prompts": [[1, 2]], "n": 1, "max_new_tokens": 8}, timeout=3600)
    waited = time.monotonic() - t0
    m = metrics()
    print(f"fairness: a 1-sequence request waited {waited:.2f} s behind a {args.calls}-call request "
          f"({m['engine_calls']} engine calls so far, {m['generate_seconds']:.1f} s of generation)")  # fmt: skip
    try:
        httpx.post(url + "/generate", json=big, timeout=1.0)
    except httpx.ReadTimeout:
        gone = time.monotonic()
    wait_for(lambda: metrics()["cancelled"] > 0)
    print(f"cancellation: noticed {time.monotonic() - gone:.2f} s after the caller left")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    worker.join()
    status, when = answered["big"]
    print(f"shutdown: SIGTERM to exit {time.monotonic() - t0:.2f} s (exit {code}); the running request got {status} "
          f"{when - t0:.2f} s after the signal")  # fmt: skip


if __name__ == "__main__":
    main()
