"""docker-compose.yml's promises, read from the file: profiles, images, GPUs, ports on 127.0.0.1, volumes,
healthchecks with service_healthy dependencies, defaults for every variable, build args in step with the Dockerfiles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
SERVICES = yaml.safe_load(COMPOSE_TEXT)["services"]
PROFILES = {"build", "train", "rollout", "env", "scripts", "model-merger", "formatter", "eval"}
GPU_SERVICES = {"train", "rollout"}
WORKSPACE_VOLUMES = {"./models:/workspace/models", "./saves:/workspace/saves", "./data:/workspace/data"}
VAR = re.compile(r"(?<!\$)\$\{(\w+)(:?[-?])?([^}]*)\}")


VERSION_SET = {"BASE_IMAGE": "base", "TORCH_VERSION": "base", "FLASH_ATTN_VERSION": "base", "VLLM_VERSION": "train"}


def dockerfile_args(name: str) -> dict[str, str | None]:
    """ARG name → its default in docker/<name>.Dockerfile (None: declared without one)."""
    text = (ROOT / "docker" / f"{name}.Dockerfile").read_text()
    return {m[0]: (m[2] if m[1] else None) for m in re.findall(r"^ARG (\w+)(=?)(\S*)$", text, flags=re.M)}


def version_set() -> dict[str, str]:
    """The GPU version set: what docker-compose.yml builds with when nothing is set."""
    out = {}
    for arg, image in VERSION_SET.items():
        service = "base" if image == "base" else image
        out[arg] = VAR.sub(lambda m: m.group(3), str(SERVICES[service]["build"]["args"][arg]))
    return out


def test_profiles_are_the_documented_ones():
    used = {p for s in SERVICES.values() for p in s.get("profiles", [])}
    assert used == PROFILES
    assert all(s.get("profiles") for s in SERVICES.values()), "a service without a profile would start on every `up`"


def test_makefile_knows_every_profile():
    line = re.search(r"^ALL_PROFILES := (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert line and set(line.group(1).split()) == PROFILES


def test_each_image_is_built_by_exactly_one_service_in_the_build_profile():
    built = {}
    for name, svc in SERVICES.items():
        if "build" in svc:
            assert "build" in svc["profiles"], f"{name} builds an image outside the build profile"
            built.setdefault(svc["build"]["dockerfile"], []).append(svc["image"])
    assert sorted(built) == [f"docker/{n}.Dockerfile" for n in ("base", "eval", "scripts", "train")]
    for dockerfile, images in built.items():
        stem = Path(dockerfile).name.removesuffix(".Dockerfile")
        assert images == [f"rldock/{stem}:${{TAG:-latest}}"], dockerfile
    for name, svc in SERVICES.items():
        assert re.fullmatch(r"rldock/(base|train|scripts|eval):\$\{TAG:-latest\}", svc["image"]), name


def test_build_arg_defaults_equal_the_dockerfile_arg_defaults():
    for name, svc in SERVICES.items():
        if "build" not in svc:
            continue
        stem = Path(svc["build"]["dockerfile"]).name.removesuffix(".Dockerfile")
        declared = dockerfile_args(stem)
        for arg, value in svc["build"].get("args", {}).items():
            assert arg in declared, f"{name}: build arg {arg} is not an ARG of {stem}.Dockerfile"
            if arg in VERSION_SET and VERSION_SET[arg] == stem:
                continue  # the version set: compose's value only (test_the_version_set_is_stated_once)
            # The value with every ${VAR:-default} replaced by its default: what an empty .env builds.
            default = VAR.sub(lambda m: m.group(3), str(value))
            assert default == declared[arg], f"{name}: {arg} defaults to {default} here, {declared[arg]} in {stem}"


def test_the_version_set_is_stated_once():
    """docker-compose.yml holds the GPU version set; the Dockerfiles declare those ARGs without a value, .env.example
    only names them, and DOCS.md's version table shows the same values."""
    for arg, image in VERSION_SET.items():
        assert arg in dockerfile_args(image) and dockerfile_args(image)[arg] is None, f"{image}.Dockerfile: {arg}"
        assert not re.search(rf"^{arg}=", (ROOT / ".env.example").read_text(), flags=re.M), f".env.example: {arg}"
    docs = (ROOT / "DOCS.md").read_text()
    table = docs[docs.index("### The GPU version set") :].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `?([^`|]*?)`? \|", table, flags=re.M))
    for arg, value in version_set().items():
        assert rows.get(arg) == (value or "empty"), f"DOCS.md's version table: {arg} = {rows.get(arg)}, compose {value}"


def test_dockerfiles_pull_nothing_but_a_base_image_given_as_a_build_arg():
    for path in sorted((ROOT / "docker").glob("*.Dockerfile")):
        text = path.read_text()
        assert not re.search(r"^#\s*syntax=", text, flags=re.M), f"{path.name}: a syntax line pulls a frontend image"
        froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
        assert froms == ["${BASE_IMAGE}"], f"{path.name}: FROM {froms}"
        assert not re.search(r"--mount=type=cache", text), f"{path.name}: cache mounts outlive the images (disk)"


def test_each_arg_is_declared_just_before_the_instruction_that_reads_it():
    """So that changing one (a uid, a version) rebuilds from its layer on, not the layers above it."""
    for path in sorted((ROOT / "docker").glob("*.Dockerfile")):
        lines = [ln for ln in path.read_text().split("\n") if ln.strip() and not ln.lstrip().startswith("#")]
        joined, i = [], 0
        while i < len(lines):  # join continuation lines into instructions
            inst = lines[i]
            while inst.endswith("\\") and i + 1 < len(lines):
                i += 1
                inst = inst[:-1] + " " + lines[i]
            joined.append(inst)
            i += 1
        after_from = joined[next(i for i, ln in enumerate(joined) if ln.startswith("FROM")) + 1 :]
        for at, inst in enumerate(after_from):
            if not inst.startswith("ARG "):
                continue
            name = inst.split()[1].split("=")[0]
            user = next(ln for ln in after_from[at + 1 :] if not ln.startswith("ARG "))
            assert re.search(rf"\$\{{?{name}\b", user), (
                f"{path.name}: ARG {name} is not read by the next step: {user[:80]}"
            )


def test_gpu_services_reserve_gpus_from_variables():
    for name in GPU_SERVICES:
        svc = SERVICES[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        ids = devices[0].get("device_ids") or [devices[0].get("count")]
        assert all(VAR.search(str(i)) for i in ids), f"{name}: GPU ids/count must come from a variable"
        assert svc.get("ipc") and svc.get("shm_size"), f"{name}: needs ipc and shm_size"
    cpu_only = {n for n, s in SERVICES.items() if "deploy" in s} - GPU_SERVICES
    assert not cpu_only, f"unexpected GPU reservations: {cpu_only}"


def test_ports_are_published_on_loopback_only():
    published = [(n, p) for n, s in SERVICES.items() for p in s.get("ports", [])]
    assert {n for n, _ in published} == {"rollout", "env"}
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"


def test_runtime_services_mount_models_saves_data_and_run_as_the_host_user():
    for name, svc in SERVICES.items():
        if name in {"base", "eval-image", "formatter"}:
            continue
        assert WORKSPACE_VOLUMES <= set(svc["volumes"]), name
        assert svc["user"] == "${HOST_UID:-1000}:${HOST_GID:-1000}", name
        assert svc["working_dir"] == "/workspace", name
    assert ".:/workspace" in SERVICES["formatter"]["volumes"]


def test_servers_have_healthchecks_and_dependents_wait_for_them():
    for name in ("rollout", "env"):
        test = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert re.search(r"http://127\.0\.0\.1:[^/]+/health\b", test), name
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}, which has no healthcheck"
            assert set(SERVICES[name]["profiles"]) & set(SERVICES[dep]["profiles"]), (
                f"{name} -> {dep}: no shared profile"
            )


def test_services_reach_each_other_by_name():
    env = SERVICES["eval"]["environment"]
    assert env["ROLLOUT_URL"] == "http://rollout:8000"
    assert env["ENV_URL"].startswith("http://env:")
    assert "127.0.0.1" not in str(env) and "localhost" not in str(env)


def test_every_variable_has_a_default():
    for name, op, _default in VAR.findall(COMPOSE_TEXT):
        assert op in (":-", "-"), f"${{{name}}} has no default (add :-default or document it as required)"


@pytest.mark.parametrize(
    "service,module",
    [("train", "trainer"), ("rollout", "rollout.server"), ("env", "env_servers"), ("eval", "scripts.eval")],
)
def test_service_commands_run_the_agreed_modules(service, module):
    command = SERVICES[service]["command"]
    assert command.startswith(f"python -m {module}"), command


def test_rollout_and_env_commands_bind_all_interfaces_inside_the_container():
    assert "--host 0.0.0.0 --port 8000" in SERVICES["rollout"]["command"]
    assert "--host 0.0.0.0 --port ${ENV_PORT:-36001}" in SERVICES["env"]["command"]
    assert SERVICES["env"]["ports"] == ["127.0.0.1:${ENV_PORT:-36001}:${ENV_PORT:-36001}"]
    assert SERVICES["rollout"]["ports"] == ["127.0.0.1:${ROLLOUT_PORT:-8000}:8000"]
