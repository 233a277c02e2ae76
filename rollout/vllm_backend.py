"""VLLMEngine: the RolloutEngine contract over vLLM's offline `LLM` class. Written for and run with vLLM 0.26.x, the
last release line that pins torch 2.11 (pyproject's `vllm` extra pins `>=0.26,<0.27`; bench/RESULTS.md has the run).

Imported only when selected (`python -m rollout.server --backend vllm`): importing this module does not import vllm.

vLLM API used (0.26; unchanged since 0.10 except where noted):
- `LLM(model, dtype, seed, max_num_seqs, gpu_memory_utilization, tensor_parallel_size, enable_prefix_caching,
  enforce_eager, logprobs_mode, worker_extension_cls)`; `LLM.generate([TokensPrompt(prompt_token_ids=...)],
  SamplingParams, use_tqdm=False)`.
- `SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, seed, logprobs=0, detokenize=False)`:
  logprobs=0 returns the sampled token's logprob only, computed from the raw logits (`logprobs_mode="raw_logprobs"`,
  set explicitly), i.e. before temperature/top-p/top-k: the behaviour policy our Completion contract asks for. Token
  ids are all we return, so nothing is detokenized. 0.26 may hand logprobs back as `FlatLogprobs`, a sequence of the
  same per-position dicts.
- Weights: `LLM.collective_rpc(name, args=...)` runs a method of `WorkerExtension` (mixed into every worker by
  `worker_extension_cls`) next to the model, which calls the model's own `load_weights(iterable of (name, tensor))`
  (HF names; vLLM fuses q/k/v and gate/up itself). Then `LLM.reset_prefix_cache()`, so no KV computed by the old
  weights is reused. The NCCL path joins the trainer's group from inside each worker (rollout/weight_transfer.py).
  vLLM 0.26's own weight-transfer engine (`LLM.init_weight_transfer_engine`/`update_weights`) is not used: the
  service speaks one sync protocol to both backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rollout.api import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams, ServedEngine, prompt_caps
from rollout.payloads import WeightSyncError

SUPPORTED_VLLM = ((0, 26), (0, 27))  # [low, high) of (major, minor): the release line it was run with


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for our SamplingParams (top_k 0 → -1: "off" in every version)."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "seed": params.seed,
        "logprobs": 0,
        "detokenize": False,
    }


def completions_from_outputs(outputs: list[Any], prompts: list[list[int]], version: int) -> list[Completion]:
    """Our Completions from vLLM RequestOutputs (in prompt order; each holds n CompletionOutputs)."""
    finish = {"stop": FINISH_STOP, "length": FINISH_LENGTH}
    out = []
    for i, (request, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        for seq in sorted(request.outputs, key=lambda s: s.index):
            ids = list(seq.token_ids)
            logprobs = [float(step[tok].logprob) for step, tok in zip(seq.logprobs, ids, strict=True)]
            reason = finish.get(seq.finish_reason, FINISH_ABORT)
            out.append(Completion(list(prompt), ids, logprobs, reason, version, i))
    return out


def require_vllm() -> None:
    """Fail fast, in one line, where vllm is not installed (before any model loading)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError("the vllm backend needs vLLM 0.26 on a CUDA machine: pip install 'rldock[vllm]'")


def _check_version(version: str) -> None:
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_VLLM
    if len(parts) == 2 and not low <= parts < high:
        raise ImportError(f"vllm {version} is installed; the vllm backend was written for vLLM 0.26.x")


def _set_vllm_environment() -> None:
    """Environment vLLM reads when an LLM starts (a value the user set wins):
    - workers are spawned, not forked: a process that touched CUDA first (a test, a bench, the trainer's side of a
      benchmark) cannot fork a CUDA worker;
    - without flashinfer installed, its sampler is off: 0.26's V2 model runner imports flashinfer's attention backend
      to ask whether its sampler is supported, and fails at start where the package is missing."""
    import importlib.util
    import os

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


class VLLMEngine(ServedEngine):
    """A vLLM `LLM` on this machine's GPU(s). Not thread-safe: the rollout server calls it from one thread."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_batch_size: int = 256,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
    ):
        require_vllm()
        import vllm

        _check_version(vllm.__version__)
        _set_vllm_environment()
        self.llm = vllm.LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_num_seqs=max_batch_size,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            logprobs_mode="raw_logprobs",
            worker_extension_cls=f"{__name__}.WorkerExtension",
        )
        self.sync_ranks = tensor_parallel_size  # one weight-sync rank per worker
        self._version = 0
        self._joined = False

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: list[int] | None = None
    ) -> list[Completion]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            raise ValueError("generate needs at least one prompt")
        kwargs = vllm_sampling_kwargs(params)
        sampling = [
            VLLMSamplingParams(**{**kwargs, "max_tokens": cap}) for cap in prompt_caps(prompts, params, max_new_tokens)
        ]
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        return completions_from_outputs(outputs, prompts, self._version)

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return self.llm.collective_rpc(method, args=args)

    def _loaded(self, version: int | None) -> int:
        self.llm.reset_prefix_cache()
        self._version = self._version + 1 if version is None else int(version)
        return self._version

    def update_weights(self, source: Any, version: int | None = None) -> int:
        """An HF safetensors folder (read by every worker), or a state dict / nn.Module (pickled to the workers:
        fine for small models; use disk or nccl sync for big ones)."""
        if isinstance(source, str | Path):
            self._rpc("rldock_load_folder", str(source))
        else:
            import torch

            state = source.state_dict() if isinstance(source, torch.nn.Module) else source
            self._rpc("rldock_load_tensors", [(n, t.detach().cpu()) for n, t in state.items()])
        return self._loaded(version)

    # weight-sync hooks the rollout server calls (the workers, not this process, join the trainer's group)
    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float):
        self.close_weight_sync()
        self._rpc("rldock_join_group", host, port, rank_offset, world_size, backend, timeout_s)
        self._joined = True

    def receive_weights(self, manifest: list[dict], bucket_bytes: int, version: int | None) -> int:
        if not self._joined:
            raise WeightSyncError("no weight-sync group: POST /init_weight_sync first")
        self._rpc("rldock_receive", manifest, bucket_bytes)
        return self._loaded(version)

    def close_weight_sync(self) -> None:
        if self._joined:
            self._rpc("rldock_close_group")
            self._joined = False

    def weights_checksum(self) -> str:
        """Checksum of worker 0's parameters under their HF names (fused q/k/v and gate/up split back), so it equals
        the trainer's checksum of the same weights."""
        return self._rpc("rldock_checksum")[0]

    def close(self) -> None:
        # the engine core is a process of its own: stop it now, not when this object happens to be collected
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


class WorkerExtension:
    """Methods mixed into each vLLM worker (`worker_extension_cls`); they run in the worker's process."""

    def rldock_load_folder(self, path: str) -> None:
        from safetensors import safe_open

        def tensors():
            for file in sorted(Path(path).glob("*.safetensors")):
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)

        self.model_runner.model.load_weights(weights=tensors())

    def rldock_load_tensors(self, named: list) -> None:
        self.model_runner.model.load_weights(weights=iter(named))

    def rldock_join_group(self, host, port, rank_offset, world_size, backend, timeout_s) -> None:
        from vllm.distributed.parallel_state import get_world_group

        from rollout.weight_transfer import SyncGroup

        rank = rank_offset + get_world_group().rank
        self.rldock_group = SyncGroup.join(host, port, rank, world_size, backend, timeout_s)

    def rldock_receive(self, manifest: list[dict], bucket_bytes: int) -> None:
        from rollout.weight_transfer import receive_weights

        self.model_runner.model.load_weights(weights=receive_weights(self.rldock_group, manifest, bucket_bytes))

    def rldock_close_group(self) -> None:
        self.rldock_group.close()
        self.rldock_group = None

    def rldock_checksum(self) -> str:
        from rollout.weight_transfer import checksum

        return checksum(unfused_parameters(self.model_runner.model))


def unfused_parameters(model: Any) -> list[tuple[str, Any]]:
    """A vLLM model's parameters under the HF checkpoint's names: each fused projection (the model class's
    `packed_modules_mapping`, e.g. qkv_proj → q/k/v_proj) split along its output rows by the layer's
    `output_sizes`, and vocabulary rows vLLM padded (`org_vocab_size`) cut off. Single-worker layout
    (tensor_parallel_size 1): shards of a larger group are not reassembled."""
    packed = getattr(type(model), "packed_modules_mapping", {})
    modules = dict(model.named_modules())
    out = []
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        prefix, _, fused = owner.rpartition(".")
        parts = packed.get(fused)
        if not parts:
            rows = getattr(modules[owner], "org_vocab_size", None)
            out.append((name, param.data if rows is None else param.data[:rows]))
            continue
        pieces = param.data.split(list(modules[owner].output_sizes), dim=0)
        out.extend((f"{prefix}.{part}.{leaf}", piece) for part, piece in zip(parts, pieces, strict=True))
    return out
