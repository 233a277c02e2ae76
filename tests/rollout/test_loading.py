"""Model resolution: built-in name, local folder, models_dir lookup, hub id, and the one-line not-found error."""

import json
from pathlib import Path

import pytest

from rollout.loading import ModelNotFoundError, resolve_model_path


def test_builtin_is_converted_to_an_hf_folder(model_path, tokenizer):
    folder = Path(model_path)
    assert (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors")), "weights must be safetensors"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # the GGUF marker must not survive conversion
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in text


def test_builtin_resolution_reuses_the_converted_folder(model_path):
    stamp = Path(model_path, "config.json").stat().st_mtime_ns
    assert resolve_model_path("smollm2-135m-instruct", Path(model_path).parent) == model_path
    assert Path(model_path, "config.json").stat().st_mtime_ns == stamp


def test_local_folder_and_models_dir_lookup(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert resolve_model_path("mine", models_dir=tmp_path) == str(tmp_path / "mine")


def test_hub_id_passes_through(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", models_dir=tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


@pytest.mark.parametrize("spec", ["./no/such/model", "/abs/missing", "plainname"])
def test_missing_model_is_one_clear_line(spec, tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path(spec, models_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and spec in message and "config.json" in message
