"""Evaluate a model on GSM8K or on an env server: accuracy, mean reward, avg@k and pass@k; resumable.

    python -m scripts.eval [--model M] [--openai-base-url URL | --rollout-url URL] [--data PATH | --env-url URL]
        [--k 4] [--limit 100] [--concurrency 8] [--out-dir DIR]

Target (the first that is set):
  --openai-base-url / OPENAI_BASE_URL  any OpenAI-compatible server (`.../v1`); --model/MODEL names the model,
                                       OPENAI_API_KEY the key; /v1/chat/completions, or /v1/completions (--api)
  --rollout-url / ROLLOUT_URL          an rldock rollout service (its OpenAI routes, with RLDOCK_API_KEY when set;
                                       model and weight version are read from its /health)
  otherwise                            --model/MODEL (HF folder, hub id or built-in name) runs in this process on
                                       the embedded engine: the only mode that imports torch
Task:
  --env-url / ENV_URL, or ENV [+ ENV_HOST, ENV_PORT] → http://ENV_HOST:ENV_PORT: multi-turn episodes on an env server
      (AgentGym protocol) of at most --max-round/MAX_ROUND model turns; reward = the sum of the step rewards
  otherwise --data: GSM8K JSONL (default data/gsm8k/test.jsonl) or a hub id, scored by env_servers.gsm8k.score
Each item gets --k samples. A sample is correct when the scorer (or the env's step info) says so, else when its
reward >= --success-threshold. pass@j uses the unbiased estimator 1 - C(n-c, j)/C(n, j) (Chen et al., 2021);
avg@k is the mean correctness of the k samples. Writes results.json, results.md and items.jsonl to --out-dir; a
rerun with the same settings skips the items already in items.jsonl.

The package: `metrics.py` (pass@k and the summary, pure), `targets.py` (what answers: an OpenAI endpoint, an rldock
rollout service, or the embedded engine), `tasks.py` (what is asked: GSM8K items or env-server episodes),
`__main__.py` (the command line and the resumable run).
"""

from __future__ import annotations

import os
from typing import Any


class EvalError(Exception):
    """A problem the user can fix; printed as one line."""


def env_var(name: str, default: Any = None) -> Any:
    """An environment variable's value, `default` when unset or empty (compose passes empty ones)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default
