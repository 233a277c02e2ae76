"""What the docs, the Makefile, .env.example and docker-compose.yml say about each other holds:
every `make …` / `docker compose …` shown exists, every variable is listed and documented with the same default,
every service's command starts (`--help`) and accepts the flags compose gives it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from scripts.local_stack import make_plans

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
SERVICES = yaml.safe_load(COMPOSE_TEXT)["services"]
PROFILES = {p for s in SERVICES.values() for p in s.get("profiles", [])}
MAKEFILE = (ROOT / "Makefile").read_text()
DOCS = [p for p in (ROOT / "README.md", ROOT / "DOCS.md") if p.is_file()]
VAR = re.compile(r"(?<!\$)\$\{(\w+)(?::?[-?]([^}]*))?\}")
REQUIRED_TARGETS = (
    "help install train test format lint doctor local-up local-down docker-build docker-build-base "
    "docker-build-train docker-build-scripts docker-build-eval docker-train-shell docker-train docker-rollout "
    "docker-env docker-eval docker-merge docker-format docker-up docker-down docker-logs docker-clean docker-bundle "
    "docker-load test-docker compose-project"
).split()
# docker compose options that take a value: before the subcommand, and after each subcommand
GLOBAL_VALUE_OPTS = {"-f", "--file", "-p", "--project-name", "--project-directory", "--env-file", "--profile"}
VALUE_OPTS = {
    "run": {"-e", "--env", "-u", "--user", "-w", "--workdir", "--name", "--entrypoint", "-v", "--volume", "-p", "-l"},
    "exec": {"-e", "--env", "-u", "--user", "-w", "--workdir", "--index"},
    "logs": {"-n", "--tail", "--since", "--until"},
    "down": {"--rmi", "-t", "--timeout"},
    "up": {"-t", "--timeout", "--scale", "--exit-code-from", "--pull", "--wait-timeout"},
    "build": {"--build-arg", "--progress"},
}
SUBCOMMANDS = {"up", "down", "run", "build", "logs", "ps", "exec", "stop", "restart", "pull", "config", "start"}


# ---------------------------------------------------------------- commands shown in the docs


def shown_commands(text: str) -> list[str]:
    """`make …` and `docker compose …` commands in code blocks and inline code spans."""
    snippets = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        snippets += block.splitlines()
    snippets += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for snippet in snippets:
        snippet = re.sub(r"\s#\s.*$", "", snippet).strip()  # trailing comments
        for part in re.split(r"&&|;|\|", snippet):
            part = re.sub(r"\[[^\]]*\]", "", part).strip()  # [OPTIONAL=…] placeholders
            if re.match(r"make(\s|$)|docker compose\s+\S", part):
                commands.append(part)
    return commands


def check_compose_command(command: str) -> None:
    tokens = shlex.split(command)[2:]
    profiles, i = [], 0
    while i < len(tokens) and tokens[i].startswith("-"):
        if tokens[i] == "--profile":
            profiles.append(tokens[i + 1])
        i += 2 if tokens[i] in GLOBAL_VALUE_OPTS else 1
    assert i < len(tokens) and tokens[i] in SUBCOMMANDS, f"{command}: no known subcommand"
    sub, rest = tokens[i], tokens[i + 1 :]
    assert set(profiles) <= PROFILES, f"{command}: unknown profile {set(profiles) - PROFILES}"
    named, j = [], 0
    while j < len(rest):
        if rest[j].startswith("-"):
            j += 2 if rest[j] in VALUE_OPTS.get(sub, set()) else 1
            continue
        named.append(rest[j])
        if sub in ("run", "exec"):
            break  # what follows is the command to run in the container
        j += 1
    for service in named:
        assert service in SERVICES, f"{command}: no service {service!r}"
        assert not profiles or set(profiles) & set(SERVICES[service]["profiles"]), f"{command}: {service} not enabled"
    assert named or sub not in ("run", "exec"), f"{command}: names no service"


def test_docs_show_commands_at_all():
    assert any("DOCS.md" == p.name for p in DOCS)
    commands = [c for p in DOCS for c in shown_commands(p.read_text())]
    assert any(c.startswith("docker compose --profile eval up") for c in commands)
    assert sum(c.startswith("make docker-") for c in commands) >= 8


def test_every_make_command_in_the_docs_exists():
    commands = sorted({c for p in DOCS for c in shown_commands(p.read_text()) if c.startswith("make")})

    def dry_run(command: str) -> tuple[str, subprocess.CompletedProcess]:
        args = ["make", "-n", "-C", str(ROOT), *shlex.split(command)[1:]]
        return command, subprocess.run(args, capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(dry_run, commands))
    failed = [f"{c}: {r.stderr.strip()}" for c, r in results if r.returncode != 0]
    assert not failed, "\n".join(failed)


def test_every_docker_compose_command_in_the_docs_names_real_profiles_and_services():
    for path in DOCS:
        for command in shown_commands(path.read_text()):
            if command.startswith("docker compose"):
                check_compose_command(command)


def test_the_compose_commands_the_makefile_runs_are_valid():
    # docker-bundle and docker-load call docker through scripts.bundle, not compose
    targets = [t for t in REQUIRED_TARGETS if t.startswith("docker-") and t not in ("docker-bundle", "docker-load")]

    def dry_run(target: str) -> tuple[str, subprocess.CompletedProcess]:
        args = ["make", "-n", "-C", str(ROOT), target, "LOCAL_DIR=saves/x", *(["GPU=0"] if len(target) % 2 else [])]
        return target, subprocess.run(args, capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(dry_run, targets))
    for target, out in results:
        assert out.returncode == 0, f"{target}: {out.stderr}"
        lines = [re.sub(r"^(\w+='[^']*' )+", "", line) for line in out.stdout.splitlines()]
        compose = [line for line in lines if line.startswith("docker compose")]
        assert compose, f"make {target} runs no docker compose command"
        for line in compose:
            check_compose_command(line)


def test_the_checker_rejects_wrong_commands():
    for bad in ("docker compose --profile nope up", "docker compose run --rm ghost", "docker compose fly"):
        with pytest.raises(AssertionError):
            check_compose_command(bad)
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "docker-nope"], capture_output=True, timeout=60)
    assert out.returncode != 0


# ---------------------------------------------------------------- Makefile


def test_every_target_is_phony_and_has_one_help_line():
    targets = re.findall(r"^([a-zA-Z0-9_-]+):(?!=)", MAKEFILE, flags=re.M)
    phony = set(" ".join(re.findall(r"^\.PHONY: (.+)$", MAKEFILE, flags=re.M)).split())
    assert set(REQUIRED_TARGETS) <= set(targets)
    for target in targets:
        assert target in phony, f"{target} is not .PHONY"
        assert re.search(rf"^{re.escape(target)}:.*## \S", MAKEFILE, flags=re.M), f"{target} has no ## help line"
    assert re.search(r"^\.DEFAULT_GOAL := help$", MAKEFILE, flags=re.M)


def test_make_help_lists_every_target_once():
    out = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory"], capture_output=True, text=True, timeout=60)
    assert "\x1b" not in out.stdout, "colour codes in a pipe"
    listed = re.findall(r"^\s+([a-zA-Z0-9_-]+)", out.stdout, flags=re.M)
    assert sorted(listed) == sorted(set(listed)) and set(REQUIRED_TARGETS) <= set(listed)


# ---------------------------------------------------------------- variables


def compose_variables() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, default in VAR.findall(COMPOSE_TEXT):
        found.setdefault(name, set()).add(default)
    return found


def secret_variables() -> set[str]:
    """Variables compose reads as build secrets (`secrets: x: environment: NAME`): no default, unset = absent."""
    secrets = yaml.safe_load(COMPOSE_TEXT).get("secrets", {})
    return {s["environment"] for s in secrets.values() if "environment" in s}


def env_example() -> tuple[dict[str, str], set[str]]:
    """(KEY=value lines, keys of the commented Makefile section)."""
    text = (ROOT / ".env.example").read_text()
    values = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    commented = set(re.findall(r"^# (\w+)=", text, flags=re.M))
    return values, commented


def makefile_variables() -> set[str]:
    return set(re.findall(r"^(?:export )?(\w+) \?=", MAKEFILE, flags=re.M))


def test_every_compose_variable_is_in_env_example_with_the_same_default():
    from tests.docker_files.test_docker_compose import VERSION_SET

    values, commented = env_example()
    for name, defaults in compose_variables().items():
        if name in VERSION_SET:
            assert name in commented, f"{name}: .env.example names the version set's variables (commented out)"
            continue
        assert name in values, f"${{{name}}} is missing from .env.example"
        assert len(defaults) == 1, f"${{{name}}} has different defaults in docker-compose.yml: {defaults}"
        assert values[name] == next(iter(defaults)), f"{name}: .env.example says {values[name]!r}, compose {defaults}"


def test_env_example_lists_nothing_stale():
    values, commented = env_example()
    known = set(compose_variables()) | makefile_variables() | secret_variables()
    assert set(values) | commented <= known, f"not read by compose or make: {(set(values) | commented) - known}"
    assert makefile_variables() <= set(values) | commented, "Makefile variables missing from .env.example"


def test_every_variable_is_documented_in_docs_md():
    docs = (ROOT / "DOCS.md").read_text()
    for name in set(compose_variables()) | makefile_variables() | secret_variables():
        assert re.search(rf"`{name}`", docs), f"{name} is not documented in DOCS.md"


# ---------------------------------------------------------------- service commands start


def help_runs() -> list[tuple[str, list[str], dict[str, str], str]]:
    """(service, argv ending in --help, environment, the command's text) for every service in every profile."""
    runs = []
    for plan in make_plans(sorted(PROFILES), ROOT / "docker-compose.yml", ROOT / "no-such.env"):
        if plan.argv[:2] == ["sh", "-c"]:
            for piece in plan.argv[2].split("&&"):
                runs.append((plan.name, ["sh", "-c", f"{piece.strip()} --help"], plan.env, piece))
        else:
            runs.append((plan.name, [*plan.argv, "--help"], plan.env, shlex.join(plan.argv)))
    return runs


def test_every_service_command_starts_and_accepts_its_flags():
    runs = help_runs()
    assert {r[0] for r in runs} == set(SERVICES)

    def run(item):
        name, argv, env, text = item
        return item, subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, runs))
    for (name, argv, _, text), out in results:
        assert out.returncode == 0, f"{name}: {shlex.join(argv)} exited {out.returncode}: {out.stderr[-500:]}"
        assert "usage" in out.stdout.lower() or "Usage" in out.stdout, f"{name}: no usage text"
        for flag in set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text)) - {"--help"}:
            assert flag in out.stdout, f"{name}: {flag} is not an option of {text.split()[0:4]}"


def test_make_lint_fails_on_violations_and_make_format_fixes_them(tmp_path):
    (tmp_path / "bad.py").write_text("import os\nx=1\n")
    make = ["make", "-s", "-C", str(ROOT), f"LINT_PATHS={tmp_path}"]
    lint = subprocess.run([*make, "lint"], capture_output=True, text=True, timeout=60)
    assert lint.returncode != 0 and "F401" in lint.stdout
    fmt = subprocess.run([*make, "format"], capture_output=True, text=True, timeout=60)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    assert (tmp_path / "bad.py").read_text() == "x = 1\n"
    assert subprocess.run([*make, "lint"], capture_output=True, timeout=60).returncode == 0


def test_two_clones_get_different_compose_projects(tmp_path):
    """Same folder name, different paths: the docker-* targets must not share containers or networks."""
    names = []
    for parent in ("a", "b"):
        clone = tmp_path / parent / "rldock"
        clone.mkdir(parents=True)
        out = subprocess.run(
            ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(clone), "compose-project"],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "COMPOSE_PROJECT_NAME"},
        )
        assert out.returncode == 0, out.stderr
        names.append(out.stdout.strip())
    assert names[0] != names[1] and all(re.fullmatch(r"rldock-\d+", n) for n in names)
    again = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "compose-project", "COMPOSE_PROJECT_NAME=mine"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout.strip() == "mine"
