"""Run docker-compose.yml's services as local processes, no Docker (`make local-up` / `make local-down`).

Commands, environments, ports and healthchecks are read from docker-compose.yml itself, so the local stack and the
Docker stack cannot drift. Compose's `${VAR:-default}` interpolation is applied (shell environment over `.env`), then:
`0.0.0.0` → `127.0.0.1`; `/workspace/...` → the repo's folders; a published port's container side → its host side
(so `ROLLOUT_PORT` moves the local service as it moves the container's published port); `http://<service>:<port>`
→ `http://127.0.0.1:<host port>`; `python` → this interpreter. Logs go to `<logs>/<service>.log`; each process
leads its own process group, recorded in `<logs>/local_stack.json`, so `down` stops exactly those groups.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "local_stack.json"
_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


class StackError(RuntimeError):
    """A problem worded for one line on the command line."""


@dataclass
class Plan:
    """One service, resolved for a local run."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(repr=False)
    cwd: str
    health_url: str | None
    health_timeout: float
    port: int | None
    depends_on: list[str]


# ---------------------------------------------------------------- compose semantics


def load_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments, blank lines and `export ` prefixes allowed; quotes stripped)."""
    values = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if missing and op and op.endswith("?"):
            raise StackError(f"{name} is required: {arg or 'set it in .env'}")
        if missing and op and op.endswith("-"):
            return arg
        return value or ""

    return _VAR.sub(sub, text)


def interpolate_tree(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(path: Path, env: dict[str, str]) -> dict:
    import yaml

    if not path.is_file():
        raise StackError(f"{path} not found: run from the repo root or pass --file")
    return interpolate_tree(yaml.safe_load(path.read_text()), env)


def parse_duration(text: str | None, default: float) -> float:
    if not text:
        return default
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in _DURATION.findall(str(text))) or default


def published_ports(svc: dict) -> dict[int, int]:
    """container port → host port, from `ports:` entries like "127.0.0.1:8000:8000" or "8000:8000"."""
    mapping = {}
    for entry in svc.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        if len(parts) >= 2:
            mapping[int(parts[-1])] = int(parts[-2])
    return mapping


def select_services(services: dict, profiles: list[str]) -> list[str]:
    """Services enabled by `profiles` (plus ones with no profile), dependencies first."""
    wanted = [n for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & set(profiles)]
    if not wanted:
        known = sorted({p for s in services.values() for p in s.get("profiles", [])})
        raise StackError(f"no service in profiles {profiles}; profiles in docker-compose.yml: {', '.join(known)}")
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise StackError(f"depends_on cycle: {' -> '.join(path + (name,))}")
        for dep in services[name].get("depends_on", []):
            if dep in wanted:
                visit(dep, path + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------- rewriting for a local run


class Rewriter:
    """Turns container addresses and paths into local ones."""

    def __init__(self, services: dict, repo: Path):
        self.repo = str(repo)
        self.ports = {name: published_ports(svc) for name, svc in services.items()}
        names = "|".join(re.escape(n) for n in services)
        self.service_url = re.compile(rf"//({names}):(\d+)")

    def text(self, value: str, own_ports: dict[int, int]) -> str:
        value = value.replace("0.0.0.0", "127.0.0.1")
        value = re.sub(r"/workspace(?=/|$|\s|[\"'])", self.repo, value)
        # Own addresses first (container port → published port), then other services' names → their published ports.
        value = re.sub(
            r"//(?:127\.0\.0\.1|localhost):(\d+)", lambda m: f"//127.0.0.1:{own_ports.get(int(m[1]), m[1])}", value
        )
        return self.service_url.sub(lambda m: self._url(m.group(1), int(m.group(2))), value)

    def _url(self, service: str, port: int) -> str:
        return f"//127.0.0.1:{self.ports[service].get(port, port)}"

    def argv(self, argv: list[str], own_ports: dict[int, int]) -> list[str]:
        out = [sys.executable if i == 0 and a == "python" else self.text(a, own_ports) for i, a in enumerate(argv)]
        for i in range(1, len(out)):
            if out[i - 1] == "--port" and out[i].isdigit():
                out[i] = str(own_ports.get(int(out[i]), out[i]))
        return out


def _environment(svc: dict) -> dict[str, str]:
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def _health_url(svc: dict) -> str | None:
    test = (svc.get("healthcheck") or {}).get("test") or []
    found = re.search(r"https?://[^\s'\"]+", " ".join(test) if isinstance(test, list) else str(test))
    return found.group(0) if found else None


def plan_service(name: str, services: dict, base_env: dict[str, str], rw: Rewriter) -> Plan:
    svc = services[name]
    ports = published_ports(svc)
    command = svc.get("command")
    if not command:
        raise StackError(f"service {name} has no command in docker-compose.yml")
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    env = dict(base_env)
    env.update({k: rw.text(v, ports) for k, v in _environment(svc).items()})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    health = _health_url(svc)
    check = svc.get("healthcheck") or {}
    timeout = parse_duration(check.get("start_period"), 60) + parse_duration(check.get("interval"), 10) * int(
        check.get("retries", 3)
    )
    return Plan(
        name=name,
        argv=rw.argv(argv, ports),
        env=env,
        cwd=rw.text(svc.get("working_dir", "/workspace"), ports),
        health_url=rw.text(health, ports) if health else None,
        health_timeout=timeout,
        port=next(iter(ports.values()), None),
        depends_on=list(svc.get("depends_on") or []),
    )


def make_plans(profiles: list[str], compose_file: Path, env_file: Path, repo: Path = ROOT) -> list[Plan]:
    base_env = {**load_dotenv(env_file), **os.environ}
    services = load_compose(compose_file, base_env).get("services", {})
    rw = Rewriter(services, repo)
    return [plan_service(n, services, base_env, rw) for n in select_services(services, profiles)]


# ---------------------------------------------------------------- processes


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (guards against a recycled pid), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # Like the servers themselves: connections lingering in TIME_WAIT do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_healthy(plan: Plan, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + plan.health_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            last = lines[-1].strip() if lines else "no output"
            raise StackError(f"{plan.name} exited with code {proc.returncode} before it was healthy; {log}: {last}")
        try:
            if httpx.get(plan.health_url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise StackError(f"{plan.name}: {plan.health_url} did not answer within {plan.health_timeout:.0f}s; see {log}")


def _read_state(logs: Path) -> dict:
    path = logs / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(logs: Path, state: dict) -> None:
    tmp = logs / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, logs / STATE_FILE)


def _live(state: dict) -> dict:
    return {n: e for n, e in state.items() if _start_time(e["pid"]) == e["start_time"]}


def start(plan: Plan, logs: Path, state: dict) -> subprocess.Popen:
    if plan.port is not None and not port_free(plan.port):
        raise StackError(f"{plan.name}: port {plan.port} on 127.0.0.1 is in use; free it or set its *_PORT variable")
    log = logs / f"{plan.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            plan.argv, cwd=plan.cwd, env=plan.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    state[plan.name] = {"pid": proc.pid, "start_time": _start_time(proc.pid), "argv": plan.argv, "log": str(log)}
    _write_state(logs, state)
    if plan.health_url:
        _wait_healthy(plan, proc, log)
    return proc


def up(plans: list[Plan], logs: Path) -> dict:
    logs.mkdir(parents=True, exist_ok=True)
    running = _live(_read_state(logs))
    if running:
        raise StackError(f"already running from {logs / STATE_FILE}: {', '.join(running)}; run make local-down first")
    state: dict = {}
    try:
        for plan in plans:
            start(plan, logs, state)
            where = plan.health_url or f"log {state[plan.name]['log']}"
            print(f"local-up: {plan.name} pid {state[plan.name]['pid']} ({where})", flush=True)
    except BaseException:
        down(logs, quiet=True)
        raise
    return state


def stop_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGTERM the group this tool started, SIGKILL what is left after `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        if not _group_alive(pgid):
            return


def down(logs: Path, quiet: bool = False) -> list[str]:
    state = _read_state(logs)
    stopped = []
    for name, entry in reversed(list(state.items())):
        if _start_time(entry["pid"]) == entry["start_time"] or _group_alive(entry["pid"]):
            stop_group(entry["pid"])
            stopped.append(name)
        if not quiet:
            print(f"local-down: {name} pid {entry['pid']} {'stopped' if name in stopped else 'was not running'}")
    (logs / STATE_FILE).unlink(missing_ok=True)
    if not state and not quiet:
        print(f"local-down: nothing recorded in {logs / STATE_FILE}")
    return stopped


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.local_stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_up = sub.add_parser("up", help="start the services of the given profiles and wait until they are healthy")
    p_up.add_argument("--profile", action="append", default=[], help="compose profile (repeatable), e.g. rollout")
    p_up.add_argument("--file", type=Path, default=ROOT / "docker-compose.yml", help="compose file")
    p_up.add_argument("--env-file", type=Path, default=ROOT / ".env", help="variables file read like compose does")
    p_up.add_argument("--dry-run", action="store_true", help="print each service's local command and exit")
    p_down = sub.add_parser("down", help="stop exactly the processes `up` started")
    for p in (p_up, p_down):
        p.add_argument("--logs", type=Path, default=ROOT / "logs", help="folder for logs and the PID file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.action == "down":
            down(args.logs)
            return 0
        if not args.profile:
            raise StackError("name at least one profile, e.g. --profile rollout --profile env")
        plans = make_plans(args.profile, args.file, args.env_file)
        if args.dry_run:
            for plan in plans:
                print(f"{plan.name}: cd {plan.cwd} && {shlex.join(plan.argv)}")
            return 0
        up(plans, args.logs)
    except StackError as err:
        print(f"local-{args.action}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
