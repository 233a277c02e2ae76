"""Schemathesis against the services' own OpenAPI documents: generated requests, valid and invalid, for every
operation of the rollout service (real SmolLM2, tiny caps so generation stays cheap on a CPU) and of each env server.
No answer may be a 5xx. Bounded: a few examples per operation, no shrinking. The admin routes are fuzzed without
their token (they must still answer 4xx), so no fuzzed request can point the service at a host or a folder."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
ENVS = ["gsm8k", "gsm8k_tools", "babyai", "searchqa", "sciworld", "textcraft"]


def fuzz(url: str) -> int:
    """Every operation of the service's OpenAPI document, FUZZ examples each; returns the calls made."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    calls = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(operation.as_strategy())
        def check(case):
            response = case.call(timeout=120)
            calls.append(1)
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r:.300}: {response.status_code} {response.text[:300]}"
            )

        check()
    return len(calls)


def test_the_rollout_service_answers_no_5xx(model_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "rollout.server", "--model", model_path, "--port", str(port), "--threads", "1"]
    args += ["--max-n", "2", "--max-tokens", "4", "--max-sequences", "4", "--max-request-tokens", "2048"]
    proc = start_server(args, url + "/health", tmp_path / "server.log", env={"RLDOCK_ADMIN_TOKEN": "not-sent"})
    try:
        assert fuzz(url) > 50
    finally:
        stop_server(proc)


@pytest.mark.parametrize("env", ENVS)
def test_env_servers_answer_no_5xx(env, tmp_path):
    import shutil

    if env == "sciworld" and shutil.which("java") is None:
        pytest.skip("sciworld needs a Java runtime (Debian: default-jre-headless)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # searchqa answers its refusals with 500 as AgentGym's does (it raises); its own 4xx mode is the one fuzzed
    extra = ["--http-errors"] if env == "searchqa" else []
    proc = start_server(
        ["-m", "env_servers", "--env", env, "--port", str(port), *extra], url + "/health", tmp_path / "s.log", 60
    )
    try:
        assert fuzz(url) > 40
    finally:
        stop_server(proc)


def test_env_server_schemas_describe_their_bodies():
    from env_servers.app import create_app
    from env_servers.registry import make_factory

    paths = create_app(make_factory("gsm8k", "data/gsm8k/train.jsonl")).openapi()["paths"]
    for route in ("/create", "/reset", "/step", "/close"):
        assert paths[route]["post"]["requestBody"]["content"]["application/json"]["schema"]["type"] == "object"
    assert "action" in paths["/step"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"]
    assert {p["name"] for p in paths["/observation"]["get"]["parameters"]} == {"env_idx", "id"}
