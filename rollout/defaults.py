"""Facts the engines, the trainer, the rollout service and the eval runner share, decided once here: which device
"auto" means, the compute dtype of a device, and the ids generation stops on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto": the current CUDA device when one is visible, else the CPU; otherwise `name` ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: no CUDA device is visible")
    return device


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype "auto" means: bfloat16 on a GPU, float32 on the CPU (no fast bf16 matmuls there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype name ("auto", "float32", "bfloat16", "float16") for `device`."""
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def _ids(value: Any) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def eos_ids_of_folder(folder: str | Path) -> list[int]:
    """Stop ids of a model folder: every EOS id that generation_config.json, config.json or the tokenizer names.

    A chat model's end-of-turn token (<|im_end|>) may be named by only some of them, depending on what wrote the
    folder; an engine that read only the first file found ran past <|im_end|> into an invented next turn on a GPU
    machine's converted SmolLM2 (bench/RESULTS.md). So every stop decision goes through this module.
    """
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            ids += _ids(json.loads(path.read_text()).get("eos_token_id"))
    tok = _tokenizer_eos_id(Path(folder))
    return list(dict.fromkeys(ids + ([tok] if tok is not None else [])))


def eos_ids_of_module(model: Any, tokenizer: Any = None) -> list[int]:
    """Stop ids of a loaded model: every EOS id its generation config and config name, plus the tokenizer's."""
    ids: list[int] = []
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids += _ids(getattr(cfg, "eos_token_id", None))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def _tokenizer_eos_id(folder: Path) -> int | None:
    """The id of tokenizer_config.json's eos_token, looked up in tokenizer.json (no tokenizer library needed)."""
    cfg_path, tok_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (cfg_path.is_file() and tok_path.is_file()):
        return None
    eos = json.loads(cfg_path.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not eos:
        return None
    tok = json.loads(tok_path.read_text())
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    return added.get(eos, (tok.get("model") or {}).get("vocab", {}).get(eos))
