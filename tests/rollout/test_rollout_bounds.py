"""The rollout service bounded and guarded, against a real `python -m rollout.server` (real SmolLM2, CPU):
request caps (400 naming the field), round-robin chunks (a small request does not wait for a big one), a caller that
goes away is dropped, SIGTERM answers 503 and exits, tokens on every protected route, and the weights root."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from rollout.api import SamplingParams
from rollout.client import HTTPRolloutClient, ServiceError
from tests.conftest import TEST_WEIGHTS_ROOT, free_port, start_server, stop_server, wait_until

pytestmark = pytest.mark.slow
KEY, ADMIN = "user-key-123", "admin-token-456"
CAPS = ["--max-n", "8", "--max-tokens", "64", "--max-sequences", "32", "--max-request-tokens", "4000"]


def launch(model_path, log_dir, *extra: str, env: dict | None = None):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "rollout.server", "--model", model_path, "--port", str(port), "--threads", "1"]
    proc = start_server([*args, "--max-batch-size", "4", *extra], url + "/health", log_dir / f"{port}.log", env=env)
    return url, proc


@pytest.fixture(scope="module")
def capped(model_path, tmp_path_factory):
    url, proc = launch(model_path, tmp_path_factory.mktemp("capped"), *CAPS, *TEST_WEIGHTS_ROOT)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def guarded(model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-root")
    env = {"RLDOCK_API_KEY": KEY, "RLDOCK_ADMIN_TOKEN": ADMIN}
    url, proc = launch(model_path, tmp_path_factory.mktemp("guarded"), "--weights-root", str(root), env=env)
    yield url, root
    stop_server(proc)


def gen(n=1, max_new_tokens=4, prompts=None, **kw) -> dict:
    return {"prompts": prompts or [[1, 2, 3]], "n": n, "max_new_tokens": max_new_tokens, **kw}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (gen(n=9), "n: 9 is above this service's limit of 8 (--max-n)"),
        (gen(max_new_tokens=65), "max_tokens: 65 is above this service's limit of 64 (--max-tokens)"),
        (gen(n=8, prompts=[[1, 2]] * 5), "prompts x n: 40 is above this service's limit of 32 (--max-sequences)"),
        (gen(n=8, max_new_tokens=60, prompts=[[1] * 200] * 4), "tokens (prompt + max_tokens, summed): 8320"),
    ],
)
def test_requests_above_the_caps_are_400_naming_the_field(capped, body, field):
    r = httpx.post(capped + "/generate", json=body, timeout=60)
    assert r.status_code == 400 and field in r.json()["detail"], r.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 9}
    r = httpx.post(capped + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and "n: 9" in r.json()["detail"]


def test_a_small_request_does_not_wait_for_a_big_one(capped):
    """32 sequences = 8 engine calls of 4; a 1-sequence request sent after it finishes long before it does."""
    done: dict[str, float] = {}

    def send(name, body):
        r = httpx.post(capped + "/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()
        return r.json()

    big = threading.Thread(target=send, args=("big", gen(n=4, max_new_tokens=48, prompts=[[1, 5, 9]] * 8)))
    big.start()
    wait_until(lambda: httpx.get(capped + "/metrics").json()["in_flight_sequences"] > 0)
    send("small", gen(n=1, max_new_tokens=2))
    assert "big" not in done, "the small request waited for the whole big one"
    big.join()
    body = httpx.get(capped + "/metrics").json()
    assert body["engine_calls"] >= 9


def test_a_caller_that_goes_away_is_dropped_before_its_next_engine_call(capped):
    before = httpx.get(capped + "/metrics").json()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(capped + "/generate", json=gen(n=4, max_new_tokens=48, prompts=[[1, 7]] * 8), timeout=1.5)
    wait_until(lambda: httpx.get(capped + "/metrics").json()["cancelled"] > before["cancelled"])
    wait_until(lambda: httpx.get(capped + "/metrics").json()["in_flight_sequences"] == 0)
    after = httpx.get(capped + "/metrics").json()
    assert after["engine_calls"] - before["engine_calls"] < 8, "all 8 engine calls ran for a caller that had gone"
    assert httpx.post(capped + "/generate", json=gen(), timeout=60).status_code == 200


def test_sigterm_answers_503_and_exits(model_path, tmp_path):
    url, proc = launch(model_path, tmp_path)
    answers: list[int] = []
    body = gen(n=4, max_new_tokens=200, prompts=[[1, 3]] * 8)  # 8 engine calls of 4 sequences x 200 tokens
    workers = [threading.Thread(target=lambda: answers.append(httpx.post(url + "/generate", json=body, timeout=120).status_code)) for _ in range(2)]  # fmt: skip
    for w in workers:
        w.start()
    wait_until(lambda: httpx.get(url + "/metrics").json()["in_flight_sequences"] > 0)
    proc.send_signal(signal.SIGTERM)
    for w in workers:
        w.join(timeout=30)
    assert answers == [503, 503]
    # uvicorn re-raises the signal once it has shut down (-SIGTERM); where it does not, main() exits 0 itself
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


PROTECTED_USER = [("GET", "/v1/models", None), ("POST", "/generate", gen()),
                  ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})]  # fmt: skip
PROTECTED_ADMIN = [("POST", "/update_weights", {"path": "x"}), ("POST", "/pause", None), ("POST", "/resume", None),
                   ("POST", "/close_weight_sync", None), ("GET", "/weights_checksum", None),
                   ("POST", "/init_weight_sync", {"host": "127.0.0.1", "port": 1, "rank_offset": 1, "world_size": 2})]  # fmt: skip


@pytest.mark.parametrize(("method", "route", "body"), PROTECTED_USER + PROTECTED_ADMIN)
def test_every_protected_route_is_401_without_its_token(guarded, method, route, body):
    url, _ = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}):
        r = httpx.request(method, url + route, json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and "RLDOCK_" in r.json()["detail"], (headers, r.text)
    if (method, route, body) in PROTECTED_ADMIN:  # the user key does not open admin routes
        r = httpx.request(method, url + route, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 401


def test_tokens_open_their_routes_and_health_stays_open(guarded):
    url, _ = guarded
    assert httpx.get(url + "/health").status_code == 200
    user = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/generate", json=gen(), headers=user, timeout=60).status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(url + "/pause", headers=admin, timeout=60).status_code == 200
    assert httpx.post(url + "/resume", headers=admin, timeout=60).status_code == 200


def test_with_only_the_admin_token_generation_stays_open(model_path, tmp_path):
    """What `make` sets up by default: RLDOCK_ADMIN_TOKEN in .env, no RLDOCK_API_KEY."""
    url, proc = launch(model_path, tmp_path, env={"RLDOCK_ADMIN_TOKEN": ADMIN})
    try:
        assert httpx.post(url + "/generate", json=gen(), timeout=60).status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        assert httpx.post(url + "/pause", timeout=60).status_code == 401
    finally:
        stop_server(proc)


def test_the_trainer_client_works_with_tokens_on_and_weights_stay_under_the_root(guarded, model_path, tmp_path):
    """HTTPRolloutClient sends the admin token (what the trainer does); disk loads outside the root are 403."""
    import shutil

    url, root = guarded
    inside = root / "v1"
    shutil.copytree(model_path, inside, copy_function=_link_or_copy)
    client = HTTPRolloutClient([url], timeout=120, recovery_s=5, token=ADMIN)
    assert client.update_weights(str(inside), 3) == 3
    assert {c.weight_version for c in client.generate([[1, 2]], SamplingParams(max_new_tokens=2))} == {3}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"refused before it is read")
    (root / "link").symlink_to(outside)
    for path in (outside, root / ".." / tmp_path.name / "elsewhere", root / "link"):
        with pytest.raises(ServiceError, match="403: path: .* is outside this service's weights root"):
            client.update_weights(str(path), 4)
    assert client.health(url)["weight_version"] == 3
    no_token = HTTPRolloutClient([url], timeout=120, recovery_s=0)
    with pytest.raises(ServiceError, match="401"):
        no_token.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    client.close()
    no_token.close()


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def test_the_service_reads_tokens_only_from_the_environment():
    from rollout.server import parse_args

    assert not {"api_key", "admin_token", "token", "key"} & set(vars(parse_args([])))
