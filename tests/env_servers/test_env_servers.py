"""Env servers over real HTTP on 127.0.0.1: AgentGym client flows, our clients, fuzzing, TTL and the cap, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.client import EnvClient, RemoteEnv, env_factory
from env_servers.pool import EnvNotFound, EnvPool, PoolFull
from env_servers.searchqa import RIGHT, WRONG
from tests.conftest import ROOT, free_port, start_server, stop_server


def _serve(tmp_path_factory, env: str, *extra: str):
    port = free_port()
    log = tmp_path_factory.mktemp(f"env_{env}") / "server.log"
    args = ["-m", "env_servers", "--env", env, "--host", "127.0.0.1", "--port", str(port), *extra]
    return start_server(args, f"http://127.0.0.1:{port}/health", log, timeout=60), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def searchqa_url(tmp_path_factory):
    proc, url = _serve(tmp_path_factory, "searchqa")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def babyai_url(tmp_path_factory):
    proc, url = _serve(tmp_path_factory, "babyai")
    yield url
    stop_server(proc)


def test_agentgym_babyai_client_flow(babyai_url):
    """The calls AgentGym's BabyAIEnvClient makes (requests, `id` in every body, `score` as reward)."""
    requests = pytest.importorskip("requests")
    assert requests.get(f"{babyai_url}/", timeout=10).json() == "This is environment BabyAI."
    created = requests.post(f"{babyai_url}/create", timeout=10)
    assert created.status_code == 200
    env_id = created.json()["id"]

    def post(path, data):
        res = requests.post(f"{babyai_url}/{path}", json={**data, "id": env_id}, timeout=10)
        assert res.status_code == 200, res.text
        return res.json()

    first = post("reset", {"data_idx": 1})
    assert {"observation", "reward", "score", "deleted", "done"} <= first.keys()
    assert first["observation"].startswith("Your goal: go to the red ball\n") and first["done"] is False
    out = post("step", {"action": "turn left"})  # the client sends the cleaned "Action:" line
    assert {"observation", "reward", "score", "done"} <= out.keys() and out["done"] is False
    assert "Available actions: [" in out["observation"]
    res = requests.get(f"{babyai_url}/observation?id={env_id}", timeout=10)
    assert res.status_code == 200
    seen = res.json()
    assert seen["observation"] == "Your goal: go to the red ball\n" + out["observation"]
    assert (seen["done"], seen["deleted"], seen["score"]) == (False, False, out["score"])
    assert post("close", {}) is True
    assert post("close", {}) is False  # AgentGym's answer for an env it does not know
    gone = requests.post(f"{babyai_url}/step", json={"id": env_id, "action": "turn left"}, timeout=10)
    assert gone.status_code == 200 and gone.json() == {"error": f"The id {env_id} is not valid."}


def test_agentgym_searchqa_client_flow(searchqa_url):
    """The calls AgentGym-RL's SearchQAEnvClient makes: bare-int create, `env_idx` bodies, `id` = dataset item."""
    requests = pytest.importorskip("requests")
    created = requests.post(f"{searchqa_url}/create", json={"id": 0}, timeout=10)
    assert created.status_code == 200
    env_id = created.json()
    assert isinstance(env_id, int)
    reset = requests.post(f"{searchqa_url}/reset", json={"id": 1, "env_idx": env_id}, timeout=10)
    assert reset.status_code == 200 and "White Nile and the Blue Nile join" in reset.json()
    question = requests.get(f"{searchqa_url}/observation?env_idx={env_id}", timeout=10).json()
    assert question == reset.json()

    def step(action):
        return requests.post(f"{searchqa_url}/step", json={"action": action, "env_idx": env_id}, timeout=10).json()

    out = step("<search>White Nile Blue Nile</search>")
    assert out["observation"].startswith("<information>") and "Khartoum" in out["observation"]
    assert (out["reward"], out["done"], out["info"]) == (0, False, None)
    assert step("<answer> Cairo </answer>") == {"observation": WRONG, "reward": 0, "done": False, "info": None}
    assert step("<answer> Khartoum </answer>") == {"observation": RIGHT, "reward": 1, "done": True, "info": None}
    assert requests.post(f"{searchqa_url}/close", json={"env_idx": env_id}, timeout=10).json() is True
    gone = requests.post(f"{searchqa_url}/step", json={"action": "x", "env_idx": env_id}, timeout=10)
    assert gone.status_code == 500 and gone.json() == {"error": f"The id {env_id} is not valid."}  # AgentGym raises


def test_env_client_and_remote_env_match_in_process(searchqa_url):
    """EnvClient over HTTP, a RemoteEnv and a plain in-process Env give the same episode."""
    actions = ["<search>deepest lake</search>", "no action here", "<answer>Baikal</answer>"]
    http = EnvClient(searchqa_url, timeout=30)
    env_id = http.create()
    trace = [http.reset(env_id, 24)["observation"]]
    trace += [(s["observation"], s["reward"], s["done"]) for s in (http.step(env_id, a) for a in actions)]
    assert http.step(env_id, "<answer>x</answer>")["observation"] == WRONG  # steps after done: allowed
    http.close(env_id)
    with pytest.raises(EnvNotFound):
        http.observation(env_id)
    runs = [trace]
    remote, plain = env_factory("searchqa", url=searchqa_url)(), env_factory("searchqa")()
    for env in (remote, plain):
        trace = [env.reset(24).text]
        trace += [(r.observation, r.reward, r.done) for r in (env.step(a) for a in actions)]
        env.close()
        runs.append(trace)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][-1] == (RIGHT, 1, True)
    assert len(remote) == 28
    with pytest.raises(EnvError, match="data index"):
        http.reset(http.create(), 10_000)
    http.shutdown()


def _fuzz_request(rng: random.Random, client: httpx.Client, ids: list[int]) -> httpx.Response:
    gets = ["/", "/health", "/observation", "/available_actions", "/list_envs"]
    path = rng.choice([*gets, "/create", "/reset", "/step", "/step", "/close", "/nope", "/step/x", "//create"])
    method = ("GET" if path in gets else "POST") if rng.random() < 0.8 else rng.choice(["PUT", "DELETE", "PATCH"])
    keys = ["id", "env_idx", "data_idx", "action", "extra"]
    values = [
        lambda: rng.choice(ids) if ids else 0,
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.random() * 1e6,
        lambda: rng.choice([True, False, None, [], {}, "", "0", "-1", "1e3", "١"]),
        lambda: "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 50))),
        lambda: rng.choice(["search[moon]", "answer[Athens]", "turn left", "go forward", "pick up", "toggle"]),
        lambda: "x" * rng.choice([70_000, 10]),
        lambda: {"nested": [1, {"a": None}]},
    ]
    shape = rng.randrange(8)
    if shape == 0:
        body = None
    elif shape == 1:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif shape == 2:
        body = rng.choice([b"{", b"[1,", b'{"id": }', b"nul", b"[" * 5000, b'"str"', b"12", b"\xff\xfe"])
    elif shape == 3:
        body = b"{" + b'"a":' * 1 + b'"' + b"y" * (1 << 20) + b'"}'  # over the 1 MiB limit
    else:
        body = json.dumps({k: rng.choice(values)() for k in rng.sample(keys, rng.randint(0, len(keys)))}).encode()
    params = {rng.choice(["id", "env_idx", "q"]): str(rng.choice(values)())[:200]} if rng.random() < 0.7 else None
    headers = {"content-type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
    return client.request(method, path, content=body, params=params, headers=headers)


@pytest.mark.parametrize("env", ["searchqa", "babyai"])
def test_fuzzed_requests_never_5xx(env, babyai_url, tmp_path_factory):
    """300 seeded random requests per server (600 in all): each answers < 500, and the server still works after.
    searchqa runs with --http-errors: in AgentGym's mode its refusals are 500s, as upstream's."""
    proc, url = _serve(tmp_path_factory, "searchqa", "--http-errors") if env == "searchqa" else (None, babyai_url)
    try:
        _fuzz(env, url)
    finally:
        if proc is not None:
            stop_server(proc)


def _fuzz(env: str, url: str) -> None:
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = [EnvClient(url).create() for _ in range(3)]
        for _ in range(300):
            resp = _fuzz_request(rng, client, ids)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, f"{resp.request.method} {resp.request.url}: {resp.text[:300]}"
            if resp.status_code >= 400:
                assert "detail" in resp.json()
            if resp.request.url.path == "/create" and resp.status_code == 200:
                ids.append(resp.json() if env == "searchqa" else resp.json()["id"])
        assert client.get("/health").status_code == 200
    assert len([s for s in statuses if s >= 400]) >= 4  # the fuzz did reach several error paths
    assert statuses.get(200, 0) >= 20  # ... and valid ones
    env_client = EnvClient(url)
    env_id = env_client.create()
    assert env_client.reset(env_id, 0)["done"] is False
    env_client.close(env_id)


def test_ttl_eviction_and_cap(tmp_path_factory):
    proc, url = _serve(tmp_path_factory, "gsm8k", "--ttl", "1", "--max-envs", "3")
    try:
        client = EnvClient(url, timeout=0.5)  # a short timeout: create gives up waiting on the cap quickly
        ids = [client.create() for _ in range(3)]
        resp = httpx.post(f"{url}/create")
        assert resp.status_code == 429 and "cap" in resp.json()["detail"]
        with pytest.raises(PoolFull):
            client.create()
        deadline = time.monotonic() + 10
        while client.list_envs() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.list_envs() == []
        with pytest.raises(EnvNotFound, match="expired after 1s idle"):
            client.reset(ids[0], 0)
        fresh = client.create()
        assert client.reset(fresh, 0)["observation"].startswith("Janet")
        assert client.health()["live"] == 1
    finally:
        stop_server(proc)


class _SlowEnv(Env):
    """A real Env that records how many calls ever overlapped (the pool's per-env lock must prevent it)."""

    def __init__(self):
        self.inside, self.max_inside, self.steps = 0, 0, 0
        self._guard = threading.Lock()

    def __len__(self):
        return 1

    def reset(self, idx):
        return Observation("start")

    def step(self, action):
        with self._guard:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(0.01)
        self.steps += 1
        with self._guard:
            self.inside -= 1
        return StepResult("ok", 1.0, False)


def test_pool_lock_per_env_and_idle_clock():
    envs: list[_SlowEnv] = []

    def make() -> _SlowEnv:
        envs.append(_SlowEnv())
        return envs[-1]

    pool = EnvPool(make, ttl=0.3, max_envs=2)
    a, b = pool.create(), pool.create()
    pool.reset(a, 0)
    pool.reset(b, 0)
    threads = [threading.Thread(target=pool.step, args=(env_id, "x")) for env_id in (a, b) * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.max_inside for e in envs] == [1, 1] and [e.steps for e in envs] == [8, 8]
    assert pool.step(a, "x")[1] == 9.0  # score: the episode's summed reward
    for _ in range(4):  # a is used every 0.1 s, b is not
        time.sleep(0.12)
        pool.step(a, "x")
    assert pool.evict_idle() == [b] and pool.ids() == [a]


def test_cli_help_and_errors():
    run = [sys.executable, "-m", "env_servers"]
    out = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--env" in out.stdout and "--max-envs" in out.stdout
    for args, needle in [
        (["--env", "nope"], "valid names: gsm8k, gsm8k_tools, babyai, sciworld, searchqa, textcraft"),
        (["--env", "searchqa", "--data", "/does/not/exist"], "/does/not/exist"),
        (["--env", "gsm8k", "--ttl", "0"], "--ttl"),
        (["--env", "babyai", "--format-reward", "0.1"], "format_reward"),
    ]:
        out = subprocess.run([*run, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr


def test_env_servers_import_no_torch():
    code = (
        "import sys\n"
        "import env_servers, env_servers.app, env_servers.client, env_servers.__main__\n"
        "import env_servers.gsm8k, env_servers.gsm8k_tools, env_servers.babyai, env_servers.sciworld\n"
        "import env_servers.searchqa, env_servers.bm25, env_servers.textcraft, env_servers.retrieval\n"
        "import env_servers.agents, env_servers.babyai_text\n"
        "from env_servers.registry import make_factory\n"
        "for name in ('gsm8k', 'gsm8k_tools', 'babyai', 'searchqa', 'textcraft'):\n"
        "    make_factory(name)().reset(0)\n"
        "from env_servers.gsm8k import score\n"
        "score('\\\\boxed{\\\\frac{36}{2}}', '#### 18')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout


def test_remote_env_survives_server_side_expiry(tmp_path_factory):
    """Closing a RemoteEnv whose slot already expired is not an error (the trainer closes every episode)."""
    proc, url = _serve(tmp_path_factory, "gsm8k_tools", "--ttl", "0.5")
    try:
        env = RemoteEnv(EnvClient(url))
        assert "<calc>" in env.reset(0).text
        assert env.step("<calc>16-3-4</calc>").observation == "<result>9</result>"
        time.sleep(1.5)
        env.close()
        with pytest.raises(EnvNotFound):
            env.step("\\boxed{18}")
    finally:
        stop_server(proc)


def test_env_token_guards_every_route_but_health(tmp_path_factory):
    """RLDOCK_ENV_TOKEN set: 401 naming the variable without it, a whole episode with it (EnvClient sends it)."""
    from env_servers.api import EnvError
    from env_servers.client import EnvClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "env_servers", "--env", "gsm8k", "--port", str(port)]
    log = tmp_path_factory.mktemp("env-token") / "server.log"
    proc = start_server(args, url + "/health", log, timeout=60, env={"RLDOCK_ENV_TOKEN": "env-secret"})
    try:
        assert httpx.get(url + "/health").status_code == 200
        for method, path in (("POST", "/create"), ("GET", "/list_envs"), ("POST", "/step"), ("POST", "/close")):
            r = httpx.request(method, url + path, json={}, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401 and "RLDOCK_ENV_TOKEN" in r.json()["detail"], (path, r.text)
        client = EnvClient(url, token="env-secret")
        env_id = client.create()
        assert client.reset(env_id, 0)["observation"]
        assert client.step(env_id, "\\boxed{0}")["done"]
        client.close(env_id)
        with pytest.raises(EnvError, match="needs `Authorization: Bearer <RLDOCK_ENV_TOKEN>`"):
            EnvClient(url, recovery_s=0).create()
    finally:
        stop_server(proc)


def test_a_client_gone_mid_body_is_no_server_error(tmp_path_factory):
    """A body cut off by a disconnect is logged in one line, not as a 500 with a traceback."""
    import socket

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("env-gone") / "server.log"
    proc = start_server(["-m", "env_servers", "--env", "gsm8k", "--port", str(port)], url + "/health", log, timeout=60)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
        time.sleep(1.0)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        stop_server(proc)
    text = log.read_text()
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]


def test_an_idle_connection_outlives_the_clients_keepalive(searchqa_url):
    """The server keeps an idle keep-alive connection open well past the client's expiry (`protocol`'s two numbers),
    so a step never goes out on a connection the server is closing: the same connection answers a second request
    after CLIENT_KEEPALIVE_S + 4 s idle (uvicorn's default, 5 s, had closed it by then)."""
    import http.client

    from env_servers.protocol import CLIENT_KEEPALIVE_S, SERVER_KEEPALIVE_S

    assert CLIENT_KEEPALIVE_S + 4 < SERVER_KEEPALIVE_S
    host, port = searchqa_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        sockets = []
        for _ in range(2):
            conn.request("GET", "/health")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
            sockets.append(conn.sock)
            time.sleep(CLIENT_KEEPALIVE_S + 4)
        assert sockets[0] is sockets[1]  # not a reconnect: the idle connection itself answered
    finally:
        conn.close()
