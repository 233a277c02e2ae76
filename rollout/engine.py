"""The embedded rollout engine: batched generation on PyTorch with a static KV cache, in the trainer's process.

One `generate` call expands every prompt n times, left-pads the batch (each row has its own position ids), runs the
prompt in one forward pass, then decodes one token per step for every row until all rows hit a stop token or
`max_new_tokens`. On CUDA each decode step (forward + sampling + logprob + stop bookkeeping) is a CUDA graph,
replayed step after step (see `rollout/graphs.py`); on CPU the same step runs eagerly.

Weights: `EmbeddedEngine(path)` loads an HF safetensors folder; `EmbeddedEngine.from_module(hf_model)` shares the
trainer's live parameters when dtype and device match (no copy: an optimizer step is seen by the next generation),
else keeps its own copy that `update_weights` refreshes in place. Llama, Qwen2, Qwen3 and Mistral (no sliding
window) architectures are supported (`rollout/model.py`).
"""

from __future__ import annotations

import json
import operator
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollout.api import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams
from rollout.model import CausalLM, ModelConfig, alias_parameters, load_folder, load_state
from rollout.sampling import sample


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_eos_ids(folder: str | Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json (an int or a list in either)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def _module_eos_ids(hf_model: nn.Module) -> list[int]:
    for cfg in (getattr(hf_model, "generation_config", None), hf_model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


class _Batch:
    """Device state of one decoding batch: KV cache, last tokens, outputs, stop flags.

    `step()` is the unit a CUDA graph captures: it reads only tensors held here, so replays see new values.
    """

    def __init__(self, engine: EmbeddedEngine, prompts: list[list[int]], params: SamplingParams, stop: list[int]):
        model, dev = engine.model, engine.device
        self.model, self.params = model, params
        self.b, self.p, self.n = len(prompts), max(map(len, prompts)), params.max_new_tokens
        self.pad = stop[0]
        ids = torch.full((self.b, self.p), self.pad, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, self.p - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        self.ids = ids.to(dev)
        self.pad_len = torch.tensor([self.p - len(x) for x in prompts], device=dev)
        self.k_cache, self.v_cache = model.new_cache(self.b, self.p + self.n)
        self.stop = torch.tensor(stop, device=dev)
        self.tokens = torch.full((self.b, self.n), self.pad, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((self.b, self.n), dtype=torch.float32, device=dev)
        self.done = torch.zeros(self.b, dtype=torch.bool, device=dev)
        self.last = torch.zeros((self.b, 1), dtype=torch.long, device=dev)
        self.slot = torch.tensor([self.p - 1], device=dev)  # cache slot of `last`
        self.col = torch.zeros(1, dtype=torch.long, device=dev)  # output column the next token goes to
        self.temperature = torch.tensor(max(params.temperature, 1e-6), device=dev)
        self.top_p = torch.tensor(params.top_p, device=dev)
        self.generator: torch.Generator | None = None

    def prefill(self) -> None:
        """Run the prompts in one pass and draw the first token."""
        st = self.model.make_step(torch.arange(self.p, device=self.ids.device), self.pad_len, self.p)
        self.record(self.model(self.ids, st, self.k_cache, self.v_cache))

    def step(self, kv_len: int) -> None:
        """Feed the last drawn token (at slot+1), draw the next one. Rows already stopped draw pad tokens."""
        self.slot += 1
        st = self.model.make_step(self.slot, self.pad_len, kv_len)
        self.record(self.model(self.last, st, self.k_cache, self.v_cache))

    def record(self, logits: torch.Tensor) -> None:
        prm = self.params
        top_p = self.top_p if prm.top_p < 1.0 else 1.0
        tok, lp = sample(logits, self.temperature, top_p, prm.top_k, prm.greedy, self.generator)
        tok = tok.masked_fill(self.done, self.pad)
        self.tokens.index_copy_(1, self.col, tok[:, None])
        self.logprobs.index_copy_(1, self.col, lp.masked_fill(self.done, 0.0)[:, None])
        self.done |= torch.isin(tok, self.stop)
        self.last.copy_(tok[:, None])
        self.col += 1

    def results(self) -> list[tuple[list[int], list[float], str]]:
        """Per row: tokens up to and including the first stop token, their logprobs, the finish reason."""
        is_stop = torch.isin(self.tokens, self.stop)
        has_stop = is_stop.any(1)
        lengths = torch.where(has_stop, is_stop.int().argmax(1) + 1, self.n).tolist()
        tokens, logprobs, has_stop = self.tokens.tolist(), self.logprobs.tolist(), has_stop.tolist()
        return [
            (tokens[i][:n], logprobs[i][:n], FINISH_STOP if has_stop[i] else FINISH_LENGTH)
            for i, n in enumerate(lengths)
        ]


class EmbeddedEngine(RolloutEngine):
    """In-process generation backend (see the module docstring).

    device: "cpu" or "cuda[:i]"; dtype: default bfloat16 on CUDA, float32 on CPU; max_batch_size: most sequences
    decoded at once (bigger requests run in several batches); eos_token_ids: default from the model's
    generation_config / config; cuda_graphs: replay each decode step as a CUDA graph on GPU; seed: seeds the engine's
    generator, used when `SamplingParams.seed` is None.
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
        eos_token_ids: list[int] | None = None,
        cuda_graphs: bool = True,
        seed: int = 0,
    ):
        dtype = dtype or default_dtype(device)
        cfg = ModelConfig.from_folder(model_path)
        model = CausalLM.empty(cfg, device, dtype)
        load_folder(model, model_path)
        eos = read_eos_ids(model_path) if eos_token_ids is None else eos_token_ids
        self._setup(model, eos, max_batch_size, cuda_graphs, seed)

    @classmethod
    def from_module(
        cls,
        hf_model: nn.Module,
        eos_token_ids: list[int] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
        cuda_graphs: bool = True,
        seed: int = 0,
    ) -> EmbeddedEngine:
        """An engine over an HF causal LM's weights: aliased (no copy) when `dtype`/`device` match the module's
        parameters, else a copy (refresh it with `update_weights(hf_model)` after each optimizer step).
        `engine.aliased` says which. dtype default: bfloat16 on CUDA, float32 on CPU."""
        device = torch.device(device or next(hf_model.parameters()).device)
        dtype = dtype or default_dtype(device)
        cfg = ModelConfig.from_hf(hf_model.config.to_dict())
        with torch.device("meta"):
            model = CausalLM(cfg)
        aliased = alias_parameters(model, hf_model, device, dtype)
        if not aliased:
            model = CausalLM.empty(cfg, device, dtype)
            with torch.no_grad():
                load_state(model, hf_model.state_dict())
        model.init_rope(device)
        self = cls.__new__(cls)
        eos = _module_eos_ids(hf_model) if eos_token_ids is None else eos_token_ids
        self._setup(model.eval(), eos, max_batch_size, cuda_graphs, seed)
        self._source = hf_model if aliased else None
        return self

    def _setup(self, model: CausalLM, eos: list[int], max_batch_size: int, cuda_graphs: bool, seed: int) -> None:
        if not eos:
            raise ValueError("no EOS token id: pass eos_token_ids (the model config names none)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.cfg = model, model.cfg
        self.device, self.dtype = model.device, model.dtype
        self.eos_token_ids = [int(e) for e in eos]
        self.max_batch_size = max_batch_size
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.seed = seed
        self._generator = torch.Generator(self.device).manual_seed(seed)
        self._lock = threading.RLock()
        self._version = 0
        self._source: nn.Module | None = None

    @property
    def aliased(self) -> bool:
        """True when the engine reads the source module's live parameters (no copy)."""
        return self._source is not None

    @property
    def weight_version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """`len(prompts) * params.n` completions, all n of prompt 0 first. Each Completion's `logprobs` are those of
        its tokens under the unmodified policy (temperature 1, no top-p/top-k), as GRPO's ratio needs; a stop token
        (model EOS or `params.stop_token_ids`) ends a row and is included (finish_reason "stop"), else "length"."""
        prompts = self._check_prompts(prompts)
        stop = self._stop_ids(params)
        longest = max(map(len, prompts)) + params.max_new_tokens
        if longest > self.cfg.max_position_embeddings:
            raise ValueError(
                f"longest prompt + max_new_tokens = {longest} exceeds the model's max_position_embeddings "
                f"({self.cfg.max_position_embeddings}): shorten the prompt or lower max_new_tokens"
            )
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]
        out: list[Completion] = []
        with self._lock, torch.inference_mode():
            generator = self._generator if params.seed is None else self._seeded(params.seed)
            for start in range(0, len(rows), self.max_batch_size):
                idx = rows[start : start + self.max_batch_size]
                batch = _Batch(self, [prompts[i] for i in idx], params, stop)
                batch.generator = generator
                results = self._decode(batch)
                out += [
                    Completion(prompts[i], tok, lp, fin, self._version, i)
                    for i, (tok, lp, fin) in zip(idx, results, strict=True)
                ]
        return out

    def _decode(self, batch: _Batch) -> list[tuple[list[int], list[float], str]]:
        batch.prefill()
        for s in range(1, batch.n):
            if batch.done.all():
                break
            batch.step(kv_len=batch.p + s)
        return batch.results()

    def _seeded(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def _check_prompts(self, prompts: list[list[int]]) -> list[list[int]]:
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        vocab = self.cfg.vocab_size
        out = []
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise ValueError(f"prompt {i} must be a list of integer token ids") from None
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            out.append(ids)
        return out

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        extra = [operator.index(t) for t in params.stop_token_ids]
        bad = [t for t in extra if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return list(dict.fromkeys(self.eos_token_ids + extra))

    # ------------------------------------------------------------------ weights

    def update_weights(self, source: Any, version: int | None = None) -> int:
        """Load new weights from an nn.Module, an HF-named state dict, or an HF safetensors folder (or file);
        return the new version (`version`, or the current one + 1). Waits for an in-flight generation to finish.

        When the engine aliases `source` (from_module with matching dtype/device) nothing is copied: the version is
        bumped. Loading anything else into an aliased engine first gives it its own weights, so the source module is
        never written to."""
        with self._lock, torch.inference_mode():
            if isinstance(source, nn.Module) and source is self._source:
                alias_parameters(self.model, source, self.device, self.dtype)  # picks up replaced Parameter objects
            else:
                self._own_weights()
                if isinstance(source, nn.Module):
                    load_state(self.model, source.state_dict())
                elif isinstance(source, dict):
                    load_state(self.model, source)
                elif isinstance(source, str | Path):
                    load_folder(self.model, source)
                else:
                    raise TypeError(f"update_weights takes an nn.Module, a state dict or a folder, not {type(source)}")
            self._version = self._version + 1 if version is None else int(version)
            return self._version

    def _own_weights(self) -> None:
        """Stop aliasing: give the engine private copies of the shared parameters."""
        if self._source is None:
            return
        for name, p in list(self.model.named_parameters()):
            mod_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(mod_name), attr, nn.Parameter(p.detach().clone(), requires_grad=False))
        if self.cfg.tie_word_embeddings:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self._source = None

    def close(self) -> None:
        with self._lock:
            self.model = None  # type: ignore[assignment]
            self._source = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
