"""HTTPRolloutClient and the payload functions: pure bodies, retries (5xx yes, 4xx no), round-robin over two real
rollout services, and a service killed and restarted mid-run being detected and re-synced."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rollout import payloads as P
from rollout.api import Completion, SamplingParams
from rollout.client import HTTPRolloutClient, ServiceError, ServiceUnavailable
from tests.conftest import ROOT, TEST_WEIGHTS_ROOT, free_port, start_server, stop_server

# ---- payloads (no server) -------------------------------------------------------------------------------------------


def test_generate_body_round_trips_through_validation():
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=9, stop_token_ids=[7], seed=1)
    req = P.GenerateRequest.model_validate(P.generate_body([[1, 2], [3]], params))
    assert req.prompts == [[1, 2], [3]] and req.sampling_params() == params


def test_parse_generate_response_checks_the_count():
    comps = [Completion([1], [5, 2], [-0.5, -0.1], "stop", 4, 0), Completion([1], [6], [-1.0], "length", 4, 0)]
    body = json.loads(json.dumps(P.generate_response(comps, "boot")))
    assert body["weight_version"] == 4 and body["boot_id"] == "boot"
    assert P.parse_generate_response(body, num_prompts=1, n=2) == comps
    with pytest.raises(ValueError, match="expected 4 completions"):
        P.parse_generate_response(body, num_prompts=2, n=2)


def test_update_bodies_validate():
    assert P.UpdateWeightsRequest.model_validate(P.disk_update_body("/w/v3", 3)).path == "/w/v3"
    spec = {"name": "a.weight", "shape": [2, 3], "dtype": "bfloat16"}
    nccl = P.UpdateWeightsRequest.model_validate(P.nccl_update_body([spec], 1 << 20, None))
    assert nccl.method == "nccl" and nccl.manifest[0].shape == [2, 3] and nccl.version is None
    init = P.InitWeightSyncRequest.model_validate(P.init_sync_body("10.0.0.2", 29500, 1, 3, "gloo", 60))
    assert (init.rank_offset, init.world_size, init.backend) == (1, 3, "gloo")
    for bad in ({"method": "disk"}, {"method": "nccl", "bucket_bytes": 8}, {"path": "p", "extra": 1}):
        with pytest.raises(ValueError):
            P.UpdateWeightsRequest.model_validate(bad)
    with pytest.raises(ValueError):
        P.TensorSpec.model_validate({"name": "x", "shape": [1], "dtype": "complex128"})


def test_plan_buckets_respects_the_byte_budget():
    manifest = [
        {"name": "a", "shape": [10], "dtype": "float32"},  # 40 bytes
        {"name": "b", "shape": [5], "dtype": "bfloat16"},  # 10
        {"name": "c", "shape": [100], "dtype": "float32"},  # 400: over budget, alone
        {"name": "d", "shape": [2, 3], "dtype": "int64"},  # 48
        {"name": "e", "shape": [], "dtype": "float32"},  # 4 (scalar)
    ]
    assert P.plan_buckets(manifest, 64) == [[0, 1], [2], [3, 4]]
    assert P.plan_buckets(manifest, 1 << 20) == [[0, 1, 2, 3, 4]]
    assert [P.tensor_nbytes(m) for m in manifest] == [40, 10, 400, 48, 4]


def test_completions_request_normalises_prompts_and_stops():
    as_list = P.CompletionsRequest.model_validate
    assert as_list({"prompt": "hi"}).prompt_list() == ["hi"]
    assert as_list({"prompt": ["a", "b"]}).prompt_list() == ["a", "b"]
    assert as_list({"prompt": [4, 5]}).prompt_list() == [[4, 5]]
    assert as_list({"prompt": [[4], [5, 6]]}).prompt_list() == [[4], [5, 6]]
    req = as_list({"prompt": "x", "stop": "\n", "max_tokens": 7, "n": 2, "user": "ignored"})
    assert req.stop_strings() == ["\n"] and req.sampling_params(16).max_new_tokens == 7
    assert as_list({"prompt": "x"}).sampling_params(16).max_new_tokens == 16
    chat = P.ChatCompletionsRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "max_completion_tokens": 9}
    )
    assert chat.sampling_params(512).max_new_tokens == 9
    assert chat.messages[0].as_template_input() == {"role": "user", "content": "a"}
    assert P.first_stop("abc\ndef###", ["###", "\n"]) == 3 and P.first_stop("abc", ["x"]) is None


def test_completions_response_sums_usage():
    choice = P.completion_choice(0, " Paris", "stop", [" Paris"], [-0.2], [0])
    out = P.completions_response("cmpl-1", 5, "m", [choice], prompt_tokens=4, completion_tokens=1)
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert out["choices"][0]["logprobs"]["token_logprobs"] == [-0.2]
    assert P.completion_choice(1, "x", "length", None, [], [])["logprobs"] is None


def test_client_imports_no_torch():
    code = "import sys, rollout.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- retries against a scripted HTTP server -------------------------------------------------------------------------


class Scripted:
    """A real HTTP server on 127.0.0.1 answering POSTs with a scripted list of (status, body); the last repeats."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script, self.hits = script, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                status, body = outer.script[min(outer.hits, len(outer.script) - 1)]
                outer.hits += 1
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


OK_BODY = P.generate_response([Completion([1, 2], [3], [-0.1], "length", 0, 0)], "boot-1")


@pytest.fixture
def scripted():
    made = []

    def make(script):
        made.append(Scripted(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_client_retries_5xx_then_succeeds(scripted):
    srv = scripted([(503, {"detail": "busy"}), (500, {"detail": "oops"}), (200, OK_BODY)])
    client = HTTPRolloutClient([srv.url], timeout=5, recovery_s=5)
    out = client.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert srv.hits == 3 and out[0].token_ids == [3]


def test_client_does_not_retry_4xx(scripted):
    srv = scripted([(400, {"detail": "prompt 0: token id 99 is outside the vocabulary"})])
    client = HTTPRolloutClient([srv.url], timeout=5, recovery_s=5)
    with pytest.raises(ServiceError, match="400: prompt 0: token id 99"):
        client.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert srv.hits == 1


def test_client_gives_up_when_the_recovery_budget_is_spent(scripted, capsys):
    """5xx and refused connections are retried with backoff, one log line per attempt, until recovery_s has passed;
    then one ServiceUnavailable line naming the service and its URL."""
    srv = scripted([(502, {"detail": "bad gateway"})])
    client = HTTPRolloutClient([srv.url], timeout=5, recovery_s=1.2)
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"rollout service http://127.0.0.1:\d+/generate unreachable.*502"):
        client.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert time.monotonic() - t0 >= 1.2
    lines = [x for x in capsys.readouterr().err.splitlines() if "attempt" in x]
    assert srv.hits == len(lines) + 1 >= 3  # 0.5 s, then the rest of the budget
    dead_url = f"http://127.0.0.1:{free_port()}"
    dead = HTTPRolloutClient([dead_url], timeout=5, recovery_s=0)
    with pytest.raises(ServiceUnavailable, match=f"{dead_url}/generate unreachable.*1 attempts.*Connect"):
        dead.generate([[1]], SamplingParams(max_new_tokens=1))


# ---- two real services --------------------------------------------------------------------------------------------


class Service:
    def __init__(self, model_path: str, log_dir: Path, port: int | None = None):
        self.model_path, self.log_dir = model_path, log_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.start()

    def start(self):
        self.starts += 1
        args = [
            "-m",
            "rollout.server",
            "--model",
            self.model_path,
            "--port",
            str(self.port),
            "--threads",
            "1",
            *TEST_WEIGHTS_ROOT,
        ]
        self.proc = start_server(args, self.url + "/health", self.log_dir / f"{self.port}-{self.starts}.log")

    def stop(self):
        stop_server(self.proc)


@pytest.fixture(scope="module")
def services(model_path, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("rollout-client")
    with ThreadPoolExecutor(2) as pool:  # start both at once
        both = list(pool.map(lambda _: Service(model_path, log_dir), range(2)))
    yield both
    for s in both:
        s.stop()


@pytest.fixture(scope="module")
def new_weights(model_path, scratch_dir):
    """The model's weights, slightly changed, as an HF safetensors folder; and their checksum."""
    import torch
    from safetensors.torch import load_file, save_file

    from rollout.weight_transfer import checksum

    state = load_file(str(Path(model_path) / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    folder = scratch_dir("weights") / "v1"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    return folder, checksum(state.items())


def test_round_robin_over_two_services(services):
    client = HTTPRolloutClient([s.url for s in services], timeout=120, recovery_s=5)
    before = [client.metrics(s.url)["requests"] for s in services]
    prompts = [[1, 10], [1, 11], [1, 12], [1, 13]]
    out = client.generate(prompts, SamplingParams(n=2, max_new_tokens=2))
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.prompt_ids for c in out] == [p for p in prompts for _ in range(2)]
    mid = [client.metrics(s.url)["requests"] for s in services]
    assert [m - b for m, b in zip(mid, before, strict=True)] == [1, 1]  # split across both
    for _ in range(2):
        client.generate([[1, 14]], SamplingParams(max_new_tokens=1))
    after = [client.metrics(s.url)["requests"] for s in services]
    assert [a - m for a, m in zip(after, mid, strict=True)] == [1, 1]  # single prompts alternate
    client.close()


def test_per_prompt_caps_over_http_keep_prompt_order(services):
    """The HTTP client's per-prompt caps: each prompt's samples stop at its cap (greedy: equal to the uncapped
    answer cut there), and the answers come back in prompt order with their prompt indices."""
    client = HTTPRolloutClient([s.url for s in services], timeout=120, recovery_s=5)
    prompts, caps = [[1, 10], [1, 11], [1, 12]], [5, 2, 5]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=6)
    full = client.generate(prompts, params)
    capped = client.generate(prompts, params, caps)
    assert [c.prompt_index for c in capped] == [0, 0, 1, 1, 2, 2]
    assert [c.prompt_ids for c in capped] == [p for p in prompts for _ in range(2)]
    assert [c.token_ids for c in capped] == [f.token_ids[: caps[f.prompt_index]] for f in full]
    client.close()


def test_restarted_service_is_detected_and_resynced(services, new_weights):
    folder, expected = new_weights
    a, b = services
    client = HTTPRolloutClient([a.url, b.url], timeout=120, recovery_s=120)
    assert client.update_weights(folder, 1) == 1
    assert {c.weight_version for c in client.generate([[1, 2], [1, 3]], SamplingParams(max_new_tokens=2))} == {1}
    old_boot = client.health(b.url)["boot_id"]

    b.stop()  # killed mid-run: the next generation finds it down, retries, and meets a fresh process
    results = []
    worker = threading.Thread(
        target=lambda: results.append(client.generate([[1, 4], [1, 5]], SamplingParams(max_new_tokens=2)))
    )
    worker.start()
    b.start()
    worker.join(180)
    assert results and {c.weight_version for c in results[0]} == {1}
    health = client.health(b.url)
    assert health["boot_id"] != old_boot and health["weight_version"] == 1
    assert client.weights_checksum(b.url) == expected == client.weights_checksum(a.url)
    assert client.metrics(b.url)["weight_updates"] == 1
    client.close()
