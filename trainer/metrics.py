"""Logging you can look at: metrics.jsonl (one JSON line per log call), offline wandb, curves.png, a tqdm bar.

Keys the plot and the bar understand (log them under these names):
  reward          mean total reward of the step's trajectories (correctness + format term)
  accuracy        fraction of the step's trajectories with a correct final answer
  format          fraction with the answer inside \\boxed{} (only when env.format_reward is on)
  eval/accuracy   greedy accuracy on the eval subset
  eval/format     fraction of eval answers inside \\boxed{} (plotted beside eval/accuracy; other eval/* keys are not)
  sft/loss        supervised warm-start loss, logged at step 0 with its own counter sft/step (a third panel)
Only rank 0 writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

# One name per quantity: the keys of metrics.jsonl are also the plot's legend, the bar's fields and wandb's charts.
TRAIN_CURVES = ("reward", "accuracy", "format")
EVAL_CURVE = "eval/accuracy"
EVAL_EXTRA = ("eval/format",)
BAR_FIELDS = ("reward", "accuracy", EVAL_CURVE)
SUMMARY_KEYS = (EVAL_CURVE, "eval/strict_accuracy", "eval/format", "reward", "accuracy", "format")
SFT_CURVE = ("sft/step", "sft/loss")
KEY_FILE = Path("wandb") / ".wandb_api_key"


def _number(v: Any) -> Any:
    # tensors and numpy scalars become floats; NaN/inf become null so every line stays valid JSON
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLogger:
    """Appends metrics to <exp_dir>/metrics.jsonl, mirrors them to wandb, draws <exp_dir>/curves.png.

    `resume_step`: the step of the checkpoint being resumed; lines logged after it (by the run that died) are dropped
    so the file reads as one continuous run. None = a fresh start, which replaces any old metrics.jsonl.
    wandb: WANDB_MODE defaults to offline; WANDB_API_KEY is used as is, else the key in wandb/.wandb_api_key (relative
    to the working directory) if present; WANDB_DIR defaults to the experiment dir. A wandb failure is a warning.
    """

    def __init__(
        self,
        exp_dir: str | Path,
        cfg_dict: dict,
        use_wandb: bool,
        rank: int = 0,
        resume_step: int | None = None,
        project: str = "rldock",
    ):
        self.active = rank == 0
        self.exp_dir = Path(exp_dir)
        self.path = self.exp_dir / "metrics.jsonl"
        self.latest: dict[str, Any] = {}
        self.wandb_run = None
        if not self.active:
            return
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        self._trim(resume_step)
        if use_wandb:
            self.wandb_run = self._init_wandb(cfg_dict, project, resumed=resume_step is not None)

    def _trim(self, resume_step: int | None) -> None:
        if resume_step is None:
            self.path.unlink(missing_ok=True)
            return
        keep = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
        _write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in keep))
        for row in keep:
            self.latest.update(row)

    def _init_wandb(self, cfg_dict: dict, project: str, resumed: bool):
        try:
            import wandb

            if "WANDB_API_KEY" not in os.environ and KEY_FILE.is_file():
                os.environ["WANDB_API_KEY"] = KEY_FILE.read_text().strip()
            id_file = self.exp_dir / "wandb_id"
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
            _write_atomic(id_file, run_id)
            return wandb.init(
                project=project,
                name=self.exp_dir.name,
                id=run_id,
                resume="allow",
                config=cfg_dict,
                dir=os.environ.get("WANDB_DIR", str(self.exp_dir)),
                mode=os.environ.get("WANDB_MODE", "offline"),
                settings=wandb.Settings(quiet=True),
            )
        except Exception as err:  # wandb is a mirror of metrics.jsonl: never let it stop training
            warnings.warn(f"wandb disabled: {type(err).__name__}: {str(err).splitlines()[0]}", stacklevel=2)
            return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one line {"step", "time", **metrics}; several calls per step (train, eval) are fine."""
        if not self.active:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _number(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.latest.update(row)
        if self.wandb_run is not None:
            try:
                # scalars only: a list (e.g. the step's item ids) stays in metrics.jsonl
                scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k not in ("step", "time")}
                self.wandb_run.log(scalars, step=step)
            except Exception as err:
                warnings.warn(f"wandb disabled: {type(err).__name__}: {err}", stacklevel=2)
                self.wandb_run = None

    def plot(self) -> Path | None:
        """Redraw curves.png from metrics.jsonl (written to a temp name, then renamed)."""
        if not self.active:
            return None
        return plot_curves(read_metrics(self.path), self.exp_dir / "curves.png", title=self.exp_dir.name)

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                warnings.warn(f"wandb finish failed: {err}", stacklevel=2)
            self.wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """`curves_figure(rows)` as a PNG at `out`, replaced atomically."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, title)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def curves_figure(rows: list[dict], title: str = ""):
    """Train reward / accuracy / format (left) and eval accuracy (+ format) (right) vs step, legends named by the
    metrics.jsonl keys; a third panel with the supervised warm-start loss when the run had one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [(row[SFT_CURVE[0]], row[SFT_CURVE[1]]) for row in rows if row.get(SFT_CURVE[1]) is not None]
    fig, axes = plt.subplots(1, 3 if sft else 2, figsize=(16 if sft else 11, 4))
    left, right = axes[0], axes[1]
    if sft:
        axes[2].plot([s for s, _ in sft], [v for _, v in sft], color="tab:purple")
        axes[2].set(title="SFT warm start", xlabel="SFT step", ylabel="cross-entropy (solution tokens)")
    for key in TRAIN_CURVES:
        steps, values = _series(rows, key)
        if steps:
            left.plot(steps, values, marker=".", label=key)
    steps, values = _series(rows, EVAL_CURVE)
    right.plot(steps, values, marker="o", color="tab:red", label=EVAL_CURVE)
    for key in EVAL_EXTRA:
        steps, values = _series(rows, key)
        if steps:
            right.plot(steps, values, marker="o", linestyle="--", color="tab:gray", label=key)
    # One y-scale for both panels (fractions and the reward compare directly), with room below 0 so that a line
    # lying on 0 is not hidden by the axis.
    top = max([1.0] + [v for line in left.lines for v in line.get_ydata()])
    left.set(title="train", xlabel="step", ylabel="reward / fraction", ylim=(-0.05 * top, 1.05 * top))
    right.set(title="eval (greedy)", xlabel="step", ylabel="fraction", ylim=(-0.05 * top, 1.05 * top))
    for ax in (left, right):
        if ax.lines:
            ax.legend(loc="best")
        ax.axhline(0, color="black", linewidth=0.6, zorder=0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def progress_bar(total: int, initial: int = 0, enabled: bool = True, rank: int = 0):
    """The loop's tqdm bar over steps (silent on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or rank != 0, desc="train", dynamic_ncols=True)


def bar_postfix(latest: dict[str, Any]) -> dict[str, str]:
    """reward, train accuracy and the last eval accuracy under their metrics.jsonl names, for `bar.set_postfix`."""
    return {key: f"{latest[key]:.3f}" for key in BAR_FIELDS if latest.get(key) is not None}


def summary_table(rows: list[dict]) -> str:
    """First and last value of each headline metric over a run: the before/after printed when it ends."""
    lines = []
    for key in SUMMARY_KEYS:
        steps, values = _series(rows, key)
        if steps:
            lines.append(
                f"  {key:<22} {values[0]:>8.3f} at step {steps[0]:<5} -> {values[-1]:>8.3f} at step {steps[-1]}"
            )
    return "\n".join(lines)
