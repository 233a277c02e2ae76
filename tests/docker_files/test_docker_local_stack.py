"""`make local-up` / `make local-down` run docker-compose.yml's services as real local processes; `make doctor`.

The stack test starts the env and rollout profiles on CPU (real SmolLM2, real env server) on free ports, gets a
rollout and an env step through them, checks each healthcheck path is served by the app factory it checks, and
checks that local-down leaves no process of theirs behind.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from scripts import doctor
from scripts.local_stack import (
    Rewriter,
    StackError,
    interpolate,
    interpolate_tree,
    load_dotenv,
    make_plans,
    select_services,
)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

# ---------------------------------------------------------------- compose semantics, on the real file


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $$HOME $SET", env) == "x d  d  $HOME x"
    with pytest.raises(StackError, match="NEEDED is required: give it"):
        interpolate("${NEEDED:?give it}", env)


def test_dotenv_values_are_read_like_compose(tmp_path):
    (tmp_path / ".env").write_text("# comment\nA=1\nexport B='two words'\n\nC=\"q\"\nnot a line\n")
    assert load_dotenv(tmp_path / ".env") == {"A": "1", "B": "two words", "C": "q"}
    assert load_dotenv(tmp_path / "missing") == {}


def test_profiles_select_services_dependencies_first():
    assert select_services(SERVICES, ["eval"]) == ["rollout", "env", "eval"]
    assert select_services(SERVICES, ["env", "rollout"]) == ["rollout", "env"]
    with pytest.raises(StackError, match="profiles in docker-compose.yml"):
        select_services(SERVICES, ["nope"])


def test_plans_rewrite_container_addresses_and_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUT_PORT", "18001")
    monkeypatch.setenv("ENV_PORT", "18002")
    monkeypatch.setenv("LOCAL_DIR", "/workspace/saves/x")
    plans = {p.name: p for p in make_plans(["eval", "model-merger"], ROOT / "docker-compose.yml", tmp_path / ".env")}
    rollout, env, ev = plans["rollout"], plans["env"], plans["eval"]
    assert rollout.argv[0] == sys.executable and rollout.argv[-4:] == ["--host", "127.0.0.1", "--port", "18001"]
    assert rollout.health_url == "http://127.0.0.1:18001/health" and rollout.port == 18001
    assert env.argv[env.argv.index("--port") + 1] == "18002" and env.health_url == "http://127.0.0.1:18002/health"
    assert ev.env["ROLLOUT_URL"] == "http://127.0.0.1:18001" and ev.env["ENV_URL"] == "http://127.0.0.1:18002"
    assert ev.depends_on == ["env", "rollout"] and ev.cwd == str(ROOT)
    assert plans["model-merger"].env["LOCAL_DIR"] == f"{ROOT}/saves/x"


def test_rewriter_leaves_other_text_alone():
    rw = Rewriter(interpolate_tree(SERVICES, {}), Path("/repo"))
    assert rw.text("/workspaces/x http://example.org:8000/a", {8000: 9000}) == "/workspaces/x http://example.org:8000/a"
    assert rw.text("http://localhost:8000/h /workspace", {8000: 9000}) == "http://127.0.0.1:9000/h /repo"


def test_local_up_refuses_a_taken_port(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = dict(os.environ, ENV_PORT=str(port))
        cmd = [sys.executable, "-m", "scripts.local_stack", "up", "--profile", "env", "--logs", str(tmp_path)]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "local_stack.json").exists()


# ---------------------------------------------------------------- healthcheck paths exist in the apps


def _routes(app) -> set[str]:
    return {r.path for r in app.routes if "GET" in getattr(r, "methods", set())}


def _health_path(service: str) -> str:
    test = " ".join(SERVICES[service]["healthcheck"]["test"])
    return urlparse(re.search(r"http://[^'\"\s]+", test).group(0)).path


def test_each_healthcheck_path_is_served_by_its_app(tokenizer):
    from env_servers.app import create_app as env_app
    from env_servers.registry import make_factory
    from rollout.client import HTTPRolloutClient
    from rollout.server import create_app as rollout_app

    # Listing routes needs no model: any RolloutEngine will do, e.g. a client of another rollout service.
    upstream = HTTPRolloutClient(f"http://127.0.0.1:{free_port()}")
    apps = {
        "rollout": rollout_app(upstream, tokenizer, name="smollm2"),
        "env": env_app(make_factory("gsm8k"), name="gsm8k"),
    }
    assert {n for n, s in SERVICES.items() if "healthcheck" in s} == set(apps)
    for service, app in apps.items():
        assert _health_path(service) in _routes(app), f"{service}: {_health_path(service)} not in {_routes(app)}"
    assert "/nope" not in _routes(apps["env"])
    upstream.close()


# ---------------------------------------------------------------- make local-up / local-down, for real


def _group_members(pgids: list[int]) -> list[int]:
    """Live (non-zombie) processes of the given process groups."""
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) in pgids and fields[0] != "Z":
                members.append(int(proc.name))
    return members


def _rollout_and_env_step(ports: dict[str, int], tokenizer) -> None:
    from env_servers.client import EnvClient
    from rollout.api import SamplingParams
    from rollout.client import HTTPRolloutClient

    envs = EnvClient(f"http://127.0.0.1:{ports['ENV_PORT']}")
    env_id = envs.create()
    question = envs.reset(env_id, data_idx=0)["observation"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    client = HTTPRolloutClient([f"http://127.0.0.1:{ports['ROLLOUT_PORT']}"], timeout=120)
    [completion] = client.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12))
    assert 1 <= len(completion.token_ids) <= 12 and len(completion.logprobs) == len(completion.token_ids)
    assert completion.weight_version == 0 and all(lp <= 0 for lp in completion.logprobs)
    result = envs.step(env_id, tokenizer.decode(completion.token_ids, skip_special_tokens=True))
    assert result["done"] is True and result["reward"] in (0.0, 1.0)
    envs.close(env_id)
    client.close()


def test_local_up_serves_a_rollout_and_an_env_step_and_local_down_stops_them(tmp_path, tokenizer):
    ports = {"ROLLOUT_PORT": free_port(), "ENV_PORT": free_port()}
    env = dict(os.environ, **{k: str(v) for k, v in ports.items()}, ROLLOUT_ARGS="--threads 2 --max-batch-size 8")
    make = ["make", "-C", str(ROOT), "--no-print-directory", f"LOGS_DIR={tmp_path}"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*make, *args], env=env, capture_output=True, text=True, timeout=300)

    up = run("local-up", "PROFILES=env rollout")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((tmp_path / "local_stack.json").read_text())
        assert set(state) == {"rollout", "env"} and (tmp_path / "rollout.log").is_file()
        pgids = [entry["pid"] for entry in state.values()]
        assert all(_group_members([g]) for g in pgids), "a service is not running"
        _rollout_and_env_step(ports, tokenizer)
        again = run("local-up", "PROFILES=env")
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        down = run("local-down")
    assert down.returncode == 0 and down.stdout.count("stopped") == 2, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while _group_members(pgids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_members(pgids) == [], "local-down left processes behind"
    assert not (tmp_path / "local_stack.json").exists()
    for port in ports.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # nothing listens there any more


# ---------------------------------------------------------------- make doctor


def test_doctor_without_a_daemon_says_so_in_one_line(tmp_path):
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    out = subprocess.run(["make", "-C", str(ROOT), "-s", "doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "Docker daemon not reachable" in lines[0] and "DOCKER_HOST" in lines[0]


def test_doctor_port_and_folder_checks(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        free = free_port()
        checks = doctor.check_ports({"ROLLOUT_PORT": taken, "ENV_PORT": free, "X_PORT": 1234}, {1234: "rldock-env-1"})
    assert [c.ok for c in checks] == [False, True, True]
    assert "set ROLLOUT_PORT" in checks[0].text and "rldock-env-1" in checks[2].text

    for name in ("models", "saves"):
        (tmp_path / name).mkdir()
    if os.getuid() == 0:  # only root can hand a folder to another uid
        os.chown(tmp_path / "saves", 54321, 54321)
    checks = {c.text.split("/")[0]: c for c in doctor.check_volumes(tmp_path, os.getuid(), os.getgid())}
    assert checks["models"].ok and not checks["data"].ok and "mkdir data" in checks["data"].text
    if os.getuid() == 0:
        assert not checks["saves"].ok and "chown" in checks["saves"].text
