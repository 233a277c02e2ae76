"""The Docker platform run for real: the four images built from scratch (CPU flavour), then every profile and make
target a user runs, each checked by what it returns. The tests run in file order and share one stack (conftest.py);
later ones use what earlier ones built or trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.docker.conftest import IMAGES, run


def layers(info: dict) -> list[str]:
    return info["RootFS"]["Layers"]


def http(stack, var: str) -> str:
    return f"http://127.0.0.1:{stack.env[var]}"


# ---------------------------------------------------------------- images


def test_images_build_from_scratch_in_layer_order(stack):
    t0 = time.monotonic()
    stack.must("docker-build", timeout=2400)
    stack.timings["cold_build_s"] = round(time.monotonic() - t0)
    info = {name: stack.image(name) for name in IMAGES}
    stack.timings["sizes_mb"] = {name: round(i["Size"] / 1e6) for name, i in info.items()}
    for child in ("train", "scripts"):
        assert layers(info[child])[: len(layers(info["base"]))] == layers(info["base"]), f"{child} is not FROM base"
    assert not set(layers(info["eval"])) & set(layers(info["base"])[1:]), "eval shares base's torch layers"


def test_a_warm_build_changes_nothing(stack):
    before = {name: stack.image(name)["Id"] for name in IMAGES}
    t0 = time.monotonic()
    stack.must("docker-build", timeout=900)
    stack.timings["warm_build_s"] = round(time.monotonic() - t0)
    assert {name: stack.image(name)["Id"] for name in IMAGES} == before


def test_the_images_hold_what_their_flavour_says(stack):
    probe = "import torch, sys; print(torch.__version__, torch.cuda.is_available(), sys.version_info[:2])"
    out = run(["docker", "run", "--rm", f"rldock/train:{stack.tag}", "python", "-c", probe], timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == stack.env["TORCH_VERSION"] and out.stdout.split()[1] == "False"
    for name, module in (("train", "vllm"), ("base", "flash_attn"), ("eval", "torch")):
        missing = run(["docker", "run", "--rm", f"rldock/{name}:{stack.tag}", "python", "-c", f"import {module}"])
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, f"{name} has {module}"
    user = {name: stack.image(name)["Config"]["User"] for name in ("train", "scripts", "eval")}
    assert set(user.values()) == {str(stack.uid)}


def test_a_root_runner_builds_and_another_uid_rebuilds_only_the_user_layer(stack):
    root_tag = f"{stack.tag}-root"
    t0 = time.monotonic()
    stack.must("docker-build", TAG=root_tag, HOST_UID="0", HOST_GID="0", timeout=900)
    stack.timings["uid_change_build_s"] = round(time.monotonic() - t0)
    assert stack.image("base", root_tag)["Id"] == stack.image("base")["Id"]
    for name in ("train", "scripts", "eval"):
        mine, roots = layers(stack.image(name)), layers(stack.image(name, root_tag))
        differ = [i for i, (a, b) in enumerate(zip(mine, roots, strict=True)) if a != b]
        assert len(differ) == 1, f"{name}: layers {differ} of {len(mine)} differ; only the user layer should"
        assert stack.image(name, root_tag)["Config"]["User"] == "0"
    out = run(["docker", "run", "--rm", f"rldock/eval:{root_tag}", "id", "-u"], timeout=120)
    assert out.stdout.strip() == "0", out.stderr


def test_secrets_stay_out_of_the_layers(stack):
    """The CA bundle and the index URL were build secrets: no layer holds the bundle's bytes, no history the URL."""
    bundle = Path(stack.env.get("PIP_CA_BUNDLE", "/nonexistent"))
    if not bundle.is_file():
        pytest.skip("no CA bundle on this host to pass as a secret")
    wanted_size, wanted = bundle.stat().st_size, hashlib.sha256(bundle.read_bytes()).hexdigest()
    for name in ("base", "eval"):
        history = run(["docker", "history", "--no-trunc", f"rldock/{name}:{stack.tag}"], timeout=120).stdout
        assert "pypi.org/simple" not in history and str(bundle) not in history
        env = stack.image(name)["Config"]["Env"]
        assert not [e for e in env if e.startswith(("PIP_CERT=", "PIP_INDEX_URL="))], env
    saved = stack.root.parent / "eval-image.tar"
    assert run(["docker", "save", "-o", str(saved), f"rldock/eval:{stack.tag}"], timeout=600).returncode == 0
    hits, scanned = [], 0
    with tarfile.open(saved) as image:
        for member in image.getmembers():
            if not member.name.endswith(("layer.tar", ".tar")) and "blobs/" not in member.name:
                continue
            try:
                layer = tarfile.open(fileobj=image.extractfile(member))
            except tarfile.TarError:
                continue
            scanned += 1
            for f in layer.getmembers():
                if f.isfile() and f.size == wanted_size:
                    if hashlib.sha256(layer.extractfile(f).read()).hexdigest() == wanted:
                        hits.append(f.name)
    saved.unlink()
    assert scanned >= len(layers(stack.image("eval"))) - 2, f"only {scanned} layers could be read"
    assert hits == [], f"the CA bundle is baked into {hits}"


# ---------------------------------------------------------------- services


def test_env_profile_serves_an_agentgym_episode_on_loopback(stack):
    t0 = time.monotonic()
    stack.must("docker-env", ENV="gsm8k", timeout=300)
    stack.timings["env_healthy_s"] = round(time.monotonic() - t0)
    url = http(stack, "ENV_PORT")
    env_id = httpx.post(f"{url}/create", json={}, timeout=30).json()["id"]
    observation = httpx.post(f"{url}/reset", json={"env_idx": env_id, "data_idx": 0}, timeout=30).json()["observation"]
    rows = [json.loads(line) for f in ("train", "test") for line in (stack.root / f"data/gsm8k/{f}.jsonl").open()]
    gold = next(r["answer"].split("####")[-1].strip() for r in rows if r["question"] in observation)
    step = httpx.post(f"{url}/step", json={"env_idx": env_id, "action": f"\\boxed{{{gold}}}"}, timeout=30).json()
    assert step["done"] is True and step["reward"] >= 1.0
    wrong = httpx.post(f"{url}/step", json={"env_idx": env_id, "action": "x"}, timeout=30)
    assert wrong.status_code in (400, 409), wrong.text
    assert httpx.post(f"{url}/close", json={"env_idx": env_id}, timeout=30).status_code == 200
    assert_loopback_only(stack)


@pytest.mark.parametrize(
    "env_name,action", [("babyai", "turn left"), ("sciworld", "look around"), ("textcraft", "inventory")]
)
def test_env_profile_runs_the_agent_envs_with_their_runtimes(stack, env_name, action):
    """babyai needs minigrid, sciworld a Java runtime (both only in the eval image), textcraft the mounted ./data."""
    stack.must("docker-env", ENV=env_name, timeout=300)
    url = http(stack, "ENV_PORT")
    assert httpx.get(f"{url}/health", timeout=30).json()["env"] == env_name
    env_id = httpx.post(f"{url}/create", json={}, timeout=120).json()["id"]
    reset = httpx.post(f"{url}/reset", json={"env_idx": env_id, "data_idx": 0}, timeout=120).json()
    assert reset["observation"].strip()
    step = httpx.post(f"{url}/step", json={"env_idx": env_id, "action": action}, timeout=120)
    assert step.status_code == 200 and step.json()["observation"].strip()
    assert "Not an action" not in step.json()["observation"]
    assert httpx.post(f"{url}/close", json={"env_idx": env_id}, timeout=30).status_code == 200


def assert_loopback_only(stack):
    for cid in stack.project_objects("container"):
        bindings = json.loads(run(["docker", "inspect", cid], timeout=60).stdout)[0]["HostConfig"]["PortBindings"]
        for binds in (bindings or {}).values():
            assert all(b["HostIp"] == "127.0.0.1" for b in binds), bindings


def test_rollout_profile_on_cpu_answers_completions_and_chat(stack):
    t0 = time.monotonic()
    stack.must("docker-rollout", timeout=600)
    stack.timings["rollout_healthy_s"] = round(time.monotonic() - t0)
    url = http(stack, "ROLLOUT_PORT")
    body = {"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0}
    done = httpx.post(f"{url}/v1/completions", json=dict(body, prompt="2 + 2 ="), timeout=120).json()
    assert done["choices"][0]["text"] and done["usage"]["completion_tokens"] > 0
    chat = dict(body, messages=[{"role": "user", "content": "Say hello."}])
    reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).json()
    assert reply["choices"][0]["message"]["content"].strip()
    assert_loopback_only(stack)


TINY = "rollout.n=2 train.batch_size=2 train.micro_batch_size=4 rollout.max_new_tokens=16 eval.every=0"


def test_training_in_the_train_container_against_the_rollout_service(stack):
    """Split mode: generation on the rollout service, new weights handed over on disk; its version advances."""
    url = http(stack, "ROLLOUT_PORT")
    before = httpx.get(f"{url}/health", timeout=30).json()["weight_version"]
    args = (
        f"experiment_name=split {TINY} train.total_steps=1 checkpoint.every=0 "
        "rollout.backend=http rollout.urls=[http://rollout:8000] weight_sync=disk"
    )
    stack.must("docker-train", f"ARGS={args}", timeout=1200)
    after = httpx.get(f"{url}/health", timeout=30).json()["weight_version"]
    assert after > before
    synced = list((stack.root / "saves/split/weights").glob("v*"))
    assert synced and all(p.stat().st_uid == stack.uid for p in synced)


def test_make_docker_train_writes_a_complete_checkpoint_owned_by_host_uid(stack):
    from trainer.checkpoint import find_latest, is_complete

    stack.must("docker-train", f"ARGS=experiment_name=tiny {TINY} train.total_steps=1 checkpoint.every=1", timeout=1200)
    exp = stack.root / "saves/tiny"
    latest = find_latest(exp)
    assert latest is not None and latest.name == "global_step_1" and is_complete(latest)
    written = [p for p in exp.rglob("*")]
    assert written and {p.stat().st_uid for p in written} == {stack.uid}
    assert (exp / "metrics.jsonl").read_text().strip()


def test_eval_profile_ends_with_the_eval_exit_code_and_results(stack):
    args = "--limit 2 --max-new-tokens 16 --concurrency 2 --out-dir saves/eval_docker --overwrite"
    out = stack.must("docker-eval", EVAL_ARGS=args, timeout=900)
    results = json.loads((stack.root / "saves/eval_docker/results.json").read_text())
    assert results, out.stdout[-2000:]
    assert (stack.root / "saves/eval_docker/results.json").stat().st_uid == stack.uid
    failing = stack.make("docker-eval", EVAL_ARGS="--api nope", timeout=900)
    assert failing.returncode != 0, "a failing eval must fail make docker-eval"


def test_make_docker_merge_verifies_the_logits(stack):
    out = stack.must(
        "docker-merge", "LOCAL_DIR=saves/tiny", "SAVE_DIR=saves/tiny/hf", "MERGE_ARGS=--verify", timeout=900
    )
    assert "verify ok" in out.stdout + out.stderr
    merged = list((stack.root / "saves/tiny/hf").glob("*.safetensors"))
    assert merged and all(p.stat().st_uid == stack.uid for p in merged)
    assert (stack.root / "saves/tiny/hf/config.json").is_file()


def test_two_train_containers_as_two_nodes_checkpoint_resume_and_merge(stack):
    """The multi-node recipe on one host: `train` and `train-node1` (docker/compose.two-nodes.yml) rendezvous over
    the compose network (torchrun c10d), one gloo rank each; both write their shard of one checkpoint, a second run
    resumes from it, and the merger turns the 2-rank checkpoint into one verified HF folder."""
    exp = stack.root / "saves/nodes"
    args = f"experiment_name=nodes {TINY} checkpoint.every=1"
    first = stack.must("docker-train-two-nodes", f"ARGS={args} train.total_steps=1", timeout=1200)
    assert "fresh start, 1 steps, 2 rank(s)" in first.stdout, first.stdout[-3000:]
    shards = sorted(p.name for p in (exp / "global_step_1/actor/model").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((exp / "global_step_1/actor/meta.json").read_text())["world_size"] == 2
    second = stack.must("docker-train-two-nodes", f"ARGS={args} train.total_steps=2", timeout=1200)
    assert "resumed at step 1" in second.stdout, second.stdout[-3000:]
    rows = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    label = f"label=com.docker.compose.project={stack.project}"
    for service in ("train", "train-node1"):
        left = run(
            ["docker", "ps", "-a", "-q", "--filter", label, "--filter", f"label=com.docker.compose.service={service}"]
        )
        assert not left.stdout.split(), f"{service} containers were left behind"
    out = stack.must(
        "docker-merge", "LOCAL_DIR=saves/nodes", "SAVE_DIR=saves/nodes/hf", "MERGE_ARGS=--verify", timeout=900
    )
    assert "verify ok" in out.stdout + out.stderr
    assert list((exp / "hf").glob("*.safetensors"))


def test_train_shell_runs_a_piped_script(stack):
    script = "python -c 'import trainer, rollout, torch; print(\"shell-ok\", torch.__version__)'\nid -u\n"
    out = stack.must("docker-train-shell", input=script, timeout=300)
    assert f"shell-ok {stack.env['TORCH_VERSION']}" in out.stdout and str(stack.uid) in out.stdout.split()


def test_docker_format_rewrites_the_checkout_as_the_host_user(stack):
    bad = stack.root / "scripts" / "_format_probe.py"
    bad.write_text("import os\nx=1\n")
    if os.getuid() == 0:
        os.chown(bad, stack.uid, stack.uid)  # as a clone of HOST_UID's own would be
    try:
        stack.must("docker-format", timeout=600)
        assert bad.read_text() == "x = 1\n"
        assert bad.stat().st_uid == stack.uid
    finally:
        bad.unlink(missing_ok=True)


def test_docker_down_leaves_no_container_or_network(stack):
    assert stack.project_objects("container"), "the earlier tests should have left services running"
    stack.must("docker-down", timeout=300)
    assert stack.project_objects("container") == [] and stack.project_objects("network") == []


def test_bundle_round_trip_runs_the_env_profile_from_it(stack):
    bundle = stack.root.parent / "bundle.tar"
    stack.must("docker-bundle", f"BUNDLE={bundle}", "IMAGES=eval", timeout=900)
    eval_id = stack.image("eval")["Id"]
    assert run(["docker", "image", "rm", f"rldock/eval:{stack.tag}"], timeout=300).returncode == 0
    try:
        stack.must("docker-load", f"BUNDLE={bundle}", timeout=900)
    finally:
        bundle.unlink(missing_ok=True)
    assert stack.image("eval")["Id"] == eval_id
    stack.must("docker-env", ENV="gsm8k", timeout=300)
    assert httpx.get(f"{http(stack, 'ENV_PORT')}/health", timeout=30).status_code == 200
    stack.must("docker-down", timeout=300)


def test_docker_clean_removes_only_its_tag(stack):
    root_tag = f"{stack.tag}-root"
    stack.must("docker-clean", TAG=root_tag, timeout=300)
    left = run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"], timeout=60).stdout.split()
    assert not [i for i in left if i.endswith(f":{root_tag}")]
    assert {f"rldock/{n}:{stack.tag}" for n in IMAGES} <= set(left)


def test_doctor_reports_a_cpu_host_and_leaves_nothing_behind(stack):
    before = run(["docker", "ps", "-a", "-q"], timeout=60).stdout.split()
    out = stack.make("doctor", timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines and all(line.startswith(("ok ", "FIX")) for line in lines), out.stdout + out.stderr
    assert any("CPU mode" in line for line in lines) and "Traceback" not in out.stderr
    assert any("images rldock/" in line and line.startswith("ok") for line in lines)
    assert run(["docker", "ps", "-a", "-q"], timeout=60).stdout.split() == before
