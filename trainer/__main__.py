"""`python -m trainer CONFIG [key=value ...]`: GRPO training (one process, or one per rank under torchrun).

Arguments are parsed and the config validated before torch is imported, so `--help` and config mistakes are instant.
"""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  python -m trainer configs/gsm8k_tiny.yaml
  python -m trainer configs/gsm8k_fast.yaml train.lr=1e-6 experiment_name=lr1e-6
  torchrun --nproc_per_node 2 -m trainer configs/gsm8k_fast.yaml
The run writes saves/<experiment_name>/ (config.yaml, metrics.jsonl, curves.png, global_step_N/, latest) and resumes
from `latest` when started again; checkpoint.resume=false starts fresh.

config keys (key=value on the command line; default in brackets):
"""


def config_keys_help() -> str:
    """Every config key with its default and docstring, read from the typed config (no torch)."""
    import textwrap

    from pydantic_core import PydanticUndefined

    from trainer.config import config_fields

    lines: list[str] = []
    for key, field, kind in config_fields():
        default = field.default_factory() if field.default_factory else field.default
        shown = "" if default is PydanticUndefined else f" [{default!r}]"
        text = f"{key}{f' ({kind})' if kind else ''}{shown}: {field.description or ''}"
        lines.append(textwrap.fill(text, 118, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="GRPO fine-tuning: rollout → reward → update → weight sync → eval → checkpoint.",
        epilog=EPILOG + config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML preset, e.g. configs/gsm8k_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-6")
    return parser.parse_args(argv)


def missing_dependency() -> str | None:
    """The first training dependency this interpreter lacks (found without importing anything)."""
    import importlib.util

    return next((m for m in ("yaml", "pydantic", "torch", "transformers") if importlib.util.find_spec(m) is None), None)


def main(argv: list[str] | None = None) -> int:
    missing = missing_dependency()
    if missing:
        print(
            f"error: {missing} is not installed for {sys.executable}: run `make train` (it installs .venv first), "
            "or `make install` and then .venv/bin/python -m trainer …",
            file=sys.stderr,
        )
        return 2
    args = parse_args(argv)
    # Idle OpenMP workers sleep instead of spinning: on a busy CPU spinning threads slow every op ~10x (measured on
    # 2 shared cores); set before torch is imported, and only when the user has not chosen a policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from trainer.checkpoint import CheckpointError
    from trainer.loop import ServiceDown, train  # imports torch

    try:
        result = train(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ServiceDown as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: the newest complete checkpoint is kept; run the same command to resume", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
