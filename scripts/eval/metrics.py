"""pass@k, avg@k and the results summary: pure functions."""

from __future__ import annotations

import math
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})


def summarize(records: list[dict], k: int) -> dict[str, Any]:
    """Aggregate per-item records (each with a `samples` list) into the reported metrics."""
    samples = [s for r in records for s in r["samples"]]
    if not samples:
        return {"items": 0, "samples": 0}
    out: dict[str, Any] = {
        "items": len(records),
        "samples": len(samples),
        "accuracy": sum(bool(s["correct"]) for s in samples) / len(samples),
        "mean_reward": sum(float(s["reward"]) for s in samples) / len(samples),
        f"avg@{k}": sum(sum(bool(s["correct"]) for s in r["samples"]) / len(r["samples"]) for r in records)
        / len(records),
    }
    for j in k_values(k):
        scored = [r for r in records if len(r["samples"]) >= j]
        out[f"pass@{j}"] = sum(
            pass_at_k(len(r["samples"]), sum(bool(s["correct"]) for s in r["samples"]), j) for r in scored
        ) / len(scored)
    for key in ("format_ok", "strict"):
        if all(key in s for s in samples):
            out[f"{key}_rate"] = sum(bool(s[key]) for s in samples) / len(samples)
    out["truncated_rate"] = sum(s.get("finish_reason") == "length" for s in samples) / len(samples)
    return out


def markdown(results: dict[str, Any]) -> str:
    """results.md: what was evaluated, then one row of metrics."""
    m = results["metrics"]
    keys = [key for key in m if key not in ("items", "samples")]
    cfg = results["config"]
    lines = [
        f"# Eval: {cfg['model']} on {cfg['task']}",
        "",
        f"target `{cfg['target']}`, k={cfg['k']}, temperature {cfg['temperature']}, top_p {cfg['top_p']}, "
        f"max_new_tokens {cfg['max_new_tokens']}; {m.get('items', 0)} items, {m.get('samples', 0)} samples",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(f"{m[key]:.4f}" for key in keys) + " |",
    ]
    return "\n".join(lines) + "\n"
