"""GSM8K through `datasets`, chat-template prompts, and a resumable, rank-sharded data cursor.

An item is the dataset row plus: `index` (row number in the split), `gold` (the final answer after `####`, commas
removed), `prompt` (chat-templated text) and `prompt_ids` (its token ids).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from env_servers import gsm8k
from trainer.config import Config, ConfigError, DataConfig

_SPLIT_KEYS = {"train": "data.train_path", "test": "data.test_path"}


def _is_local(path: str) -> bool:
    # a hub id is exactly "owner/name"; anything with an extension, more parts or a path prefix is a file
    parts = path.split("/")
    return Path(path).exists() or len(parts) != 2 or path.startswith((".", "/", "~")) or Path(path).suffix != ""


def load_split(path: str, split: str, hub_config: str = "main"):
    """A GSM8K split as a `datasets.Dataset`: a local JSON/JSONL file, or a hub dataset id (with `hub_config`)."""
    import datasets

    if _is_local(path):
        if not Path(path).expanduser().is_file():
            key = _SPLIT_KEYS.get(split, "data.train_path")
            raise ConfigError(
                f"{split} data file {path} not found; set {key}=PATH to a GSM8K JSONL file or a hub id like openai/gsm8k"
            )
        # A local file loads in a blink: its "Generating train split" bars would only be noise before the step bar.
        datasets.disable_progress_bars()
        try:
            return datasets.load_dataset("json", data_files=str(Path(path).expanduser()), split="train")
        finally:
            datasets.enable_progress_bars()
    return datasets.load_dataset(path, hub_config, split=split)


def gold_answer(item: dict[str, Any]) -> str:
    """The final answer of a GSM8K item, parsed the way the reward parses it."""
    return gsm8k.gold_answer(item["answer"])


def build_prompt(tokenizer, question: str, data: DataConfig) -> str:
    """The chat-templated prompt text (generation prompt appended) for one question."""
    messages = [{"role": "user", "content": data.prompt_template.format(question=question)}]
    if data.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prepare_chunk(rows: list[dict], start: int, tokenizer, data: DataConfig, max_prompt_tokens: int) -> list[dict]:
    prompts = [build_prompt(tokenizer, row["question"], data) for row in rows]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]  # the template already holds the specials
    return [
        {**row, "index": start + i, "gold": gold_answer(row), "prompt": text, "prompt_ids": list(prompt_ids)}
        for i, (row, text, prompt_ids) in enumerate(zip(rows, prompts, ids, strict=True))
        if len(prompt_ids) <= max_prompt_tokens
    ]


def prepare_items(rows, tokenizer, data: DataConfig, max_prompt_tokens: int, limit: int | None = None) -> list[dict]:
    """Rows (a Dataset or a list of dicts) → items with prompt text and ids; prompts over the cap are dropped.

    `limit` keeps the first N rows that survive the length filter (only as many rows are tokenized as needed).
    """
    rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    items: list[dict] = []
    chunk = 512 if limit is None else max(limit, 16)
    for start in range(0, len(rows), chunk):
        items += _prepare_chunk(rows[start : start + chunk], start, tokenizer, data, max_prompt_tokens)
        if limit is not None and len(items) >= limit:
            break
    return items[:limit]


def load_train_items(cfg: Config, tokenizer) -> list[dict]:
    """The training items: `data.train_path`, the first `data.max_train_samples` rows that fit the prompt cap."""
    rows = load_split(cfg.data.train_path, "train", cfg.data.hub_config)
    return prepare_items(rows, tokenizer, cfg.data, cfg.rollout.max_prompt_tokens, cfg.data.max_train_samples)


def load_eval_items(cfg: Config, tokenizer, num_samples: int | None = None) -> list[dict]:
    """The eval subset: the first `eval.num_samples` items of `data.test_path` (fixed, so evals are comparable)."""
    rows = load_split(cfg.data.test_path, "test", cfg.data.hub_config)
    n = num_samples or cfg.eval.num_samples
    return prepare_items(rows, tokenizer, cfg.data, cfg.rollout.max_prompt_tokens, n)


def num_steps(num_items: int, batch_size: int, epochs: int) -> int:
    """Steps needed to see `epochs` passes over `num_items` items, `batch_size` prompts per step."""
    return max(1, math.ceil(num_items * epochs / batch_size))


class DataCursor:
    """Walks the items in a seeded per-epoch order; `state_dict()` resumes at exactly the same place.

    Batches run straight across epoch boundaries (nothing is dropped). With `world_size` ranks, every rank advances
    through the same global batch of k items and returns only its contiguous slice [r*k//W, (r+1)*k//W).
    """

    def __init__(self, items: list, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not items:
            raise ValueError("no data items (all prompts dropped by rollout.max_prompt_tokens, or an empty file?)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.items, self.seed, self.shuffle = items, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def _next_global(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), len(self.items) - self.position)
            out += self._order[self.position : self.position + take].tolist()
            self.position += take
            if self.position == len(self.items):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return out

    def next_batch(self, k: int) -> list:
        """The next global batch of k items, of which this rank's slice is returned."""
        idx = self._next_global(k)
        lo, hi = self.rank * k // self.world_size, (self.rank + 1) * k // self.world_size
        return [self.items[i] for i in idx[lo:hi]]

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_items": len(self.items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_items"] != len(self.items):
            raise ValueError(
                f"checkpoint data cursor covers {state['num_items']} items but the data now has {len(self.items)}; "
                "resume with the same data settings or start fresh with checkpoint.resume=false"
            )
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
