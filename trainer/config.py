"""The typed config tree: one pydantic model per section, a docstring on every field, YAML presets + key=value overrides.

Importing this module does not import torch, so `python -m trainer --help` and config errors are instant.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from env_servers.gsm8k import PROMPT_TEMPLATE
from rollout.api import Count, Temperature, TopK, TopP
from rollout.recovery import DEFAULT_BUDGET_S


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    path: str = "smollm2-135m-instruct"
    """HF hub id, local HF folder, or a built-in name (`smollm2-135m-instruct`, converted once into models/)."""
    models_dir: str = "models"
    """Where built-in models are converted to and where bare names are looked up."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training/rollout dtype. auto = bfloat16 on GPU, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


class DataConfig(Section):
    train_path: str = "data/gsm8k/train.jsonl"
    """Train split: a local JSONL file, or an HF dataset id such as `openai/gsm8k` (with `hub_config`)."""
    test_path: str = "data/gsm8k/test.jsonl"
    """Test split used by periodic eval (same forms as train_path)."""
    hub_config: str = "main"
    """Dataset config name when the paths are hub ids."""
    max_train_samples: int | None = Field(None, ge=1)
    """Use only the first N training items (None = all)."""
    epochs: int = Field(1, ge=1)
    """Passes over the (truncated) training set; the run length is derived from this unless train.total_steps is set."""
    shuffle: bool = True
    """Shuffle the training order each epoch (seeded by train.seed, so resume replays the same order)."""
    system_prompt: str | None = None
    """System message for the chat template (None = the template's default)."""
    prompt_template: str = PROMPT_TEMPLATE
    """User message; `{question}` is replaced by the item's question."""


class RolloutConfig(Section):
    backend: Literal["embedded", "http"] = "embedded"
    """embedded = in-process engine; http = rollout service(s) at `urls` (the service runs the embedded engine or
    vLLM: `python -m rollout.server --backend vllm`)."""
    urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"])
    """Rollout service base URLs (backend=http); requests are spread round-robin."""
    n: Count = 4
    """Completions per prompt (the GRPO group size)."""
    temperature: Temperature = 1.0
    """Sampling temperature for training rollouts."""
    top_p: TopP = 1.0
    """Nucleus sampling mass."""
    top_k: TopK = 0
    """Top-k truncation (0 = off)."""
    max_new_tokens: Count = 256
    """Completion length cap for training rollouts."""
    max_prompt_tokens: int = Field(512, ge=1)
    """Prompts longer than this are dropped from the dataset."""
    max_batch_size: int = Field(64, ge=1)
    """Most sequences the embedded engine decodes at once (bigger requests are split)."""
    max_staleness: int = Field(0, ge=0)
    """Async rollout bound: no trained sample comes from weights older than this many versions (0 = synchronous)."""
    async_workers: int = Field(2, ge=1)
    """Async rollout: producer threads, each running whole workflow calls (with 2, one starts the next batch's
    generation while the other scores the batch it just generated; trainer/async_rollout.py)."""
    cuda_graphs: bool = True
    """Embedded engine on GPU: capture each decode step as a CUDA graph."""
    timeout_s: float = Field(600.0, gt=0)
    """backend=http: timeout of one generation request to a rollout service, in seconds."""


class GRPOConfig(Section):
    clip_eps: float = Field(0.2, gt=0)
    """PPO clip range (lower)."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip range (None = clip_eps; DAPO's clip-higher uses e.g. 0.28)."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std (False = Dr.GRPO)."""
    beta: float = Field(0.0, ge=0)
    """Weight of the k3 KL penalty to a frozen reference model (0 = no reference model is loaded)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "token_sum_norm"] = "token_mean"
    """How token losses become one number: mean over all tokens of the batch, mean of per-sequence means, or the sum
    divided by (batch × max_new_tokens) as in Dr.GRPO."""
    drop_zero_adv_groups: bool = False
    """Drop groups whose rewards are all equal (they carry no gradient) before the update."""


class SFTConfig(Section):
    steps: int = Field(0, ge=0)
    """Supervised warm-start steps before GRPO (0 = off): cross-entropy on the training split's reference solutions
    (GSM8K-style items), calculator annotations removed and the final answer written as \\boxed{N}. Runs once per
    experiment, before GRPO step 0; a resumed run never repeats it."""
    lr: float = Field(2e-5, gt=0)
    """Peak AdamW learning rate of the warm start (its own optimizer: GRPO starts with fresh AdamW moments)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps, then a cosine decay to zero at the last SFT step."""
    batch_size: int = Field(64, ge=1)
    """Examples (prompt + solution) per SFT step; split across ranks."""
    micro_batch_size: int = Field(16, ge=1)
    """Examples per forward/backward; gradients accumulate over micro-batches."""
    max_tokens: int = Field(512, ge=2)
    """Examples whose prompt + solution exceed this many tokens are dropped (never cut: a cut solution would teach
    the model to stop without an answer)."""


class TrainConfig(Section):
    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps; constant afterwards."""
    batch_size: int = Field(8, ge=1)
    """Prompts per step (each sampled `rollout.n` times); split across ranks."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward; gradients accumulate over micro-batches."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global grad norm."""
    total_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (None = derived from data.epochs)."""
    seed: int = 0
    """Seed for data order, sampling and init."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads (None = torch's default)."""
    compile: bool = True
    """On CUDA, compile each decoder layer with torch.compile (fuses norms, RoPE and SwiGLU; the first steps pay
    the compile). Ignored on CPU and with gradient checkpointing."""
    compute_copy: bool = True
    """One process, compute dtype below fp32 (bf16 on GPU): forward and backward run on a compute-dtype copy of the
    weights, refreshed from the fp32 master after each optimizer step, and each micro-batch's gradients are added
    into fp32 master gradients (what FSDP2's mixed precision does under torchrun). Costs one compute-dtype copy of
    the weights. False: autocast over the fp32 weights (each weight cast at each use, residual stream in fp32)."""
    cpu_offload: bool = False
    """FSDP2 keeps the fp32 master weights, gradients and AdamW state in host memory and steps the optimizer on
    the CPU: a model whose optimizer state does not fit the GPUs trains, slower. Needs CUDA and torchrun (also for one
    GPU: `torchrun --nproc_per_node 1 -m trainer ...`)."""
    recovery_s: float = Field(DEFAULT_BUDGET_S, ge=0)
    """How long a rollout service or env server may stay unreachable (or answer 5xx) before training stops with a
    checkpoint: a restarting service is waited for with exponential backoff, one log line per attempt (0: at once)."""
    time_limit_s: float = Field(0.0, ge=0)
    """Wall-clock budget of the run in seconds (0 = none): the GRPO loop stops after the step that crosses it, then
    evaluates, saves and exits normally. Counted from the start of each trainer process (model loading, SFT, evals and
    saves included) and summed over resumes through the checkpoint, so resumed processes share one budget."""


class InProcessSyncConfig(Section):
    kind: Literal["inprocess"] = "inprocess"
    """Shared memory: each rank's embedded engine reads the trainer's weights (rollout.backend=embedded)."""


class DiskSyncConfig(Section):
    kind: Literal["disk"]
    """HF safetensors folders under saves/<exp>/weights/, loaded by every rollout service (rollout.backend=http)."""
    keep: int = Field(2, ge=1)
    """Newest weight versions kept (older ones are pruned)."""


class NcclSyncConfig(Section):
    kind: Literal["nccl"]
    """A broadcast in a process group of the trainer (rank 0) and every rollout service worker (rollout.backend=http)."""
    host: str = "127.0.0.1"
    """The trainer's address as the rollout services see it (they connect to its TCP store)."""
    port: int = Field(0, ge=0, le=65535)
    """TCP store port on the trainer (0 = any free port; the services are told it over HTTP)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl when the trainer has CUDA, else gloo (CPU)."""
    bucket_mb: int = Field(256, ge=1)
    """Parameters are broadcast in buckets of at most this many MiB."""
    timeout_s: float = Field(600.0, gt=0)
    """How long a rendezvous or broadcast may wait for the other side before failing."""


WeightSyncConfig = Annotated[InProcessSyncConfig | DiskSyncConfig | NcclSyncConfig, Field(discriminator="kind")]
SYNC_OF_BACKEND = {"embedded": ("inprocess",), "http": ("disk", "nccl")}  # which syncs reach which engines


class EvalConfig(Section):
    every: int = Field(10, ge=0)
    """Evaluate every N steps (0 = never; a final eval always runs when > 0)."""
    num_samples: int = Field(64, ge=1)
    """Test items per periodic eval (the first N of the test split)."""
    max_new_tokens: int = Field(320, ge=1)
    """Completion cap for eval (greedy)."""
    at_start: bool = True
    """Evaluate before the first step, so the curve has a baseline."""


class CheckpointConfig(Section):
    save_dir: str = "saves"
    """Root for experiments: saves/<experiment_name>/."""
    every: int = Field(10, ge=0)
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Keep the newest K checkpoints."""
    at_end: bool = True
    """Save when the run ends (false: a throwaway or benchmark run that need not write its weights and optimizer)."""
    resume: bool = True
    """Resume from saves/<exp>/latest when it exists; false starts fresh (old checkpoints are left in place)."""


class LoggingConfig(Section):
    wandb: bool = True
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "rldock"
    """W&B project name."""
    progress: bool = True
    """Show a tqdm progress bar."""


class EnvConfig(Section):
    name: str = "gsm8k"
    """Environment / reward: gsm8k (single turn) or an agent env (gsm8k_tools, babyai, sciworld, searchqa, textcraft)."""
    url: str | None = None
    """Env server base URL (None = run the env in-process)."""
    data: str | None = None
    """Dataset of an in-process agent env outside the GSM8K family (the env server's --data): a searchqa folder, a
    TextCraft folder holding recipes/, babyai level ids or sciworld task names, comma-separated. None: the env's own."""
    format_reward: float = Field(0.0, ge=0)
    """Extra reward for an answer written inside \\boxed{} (reported separately from correctness)."""
    max_rounds: int = Field(1, ge=1)
    """Agent turns per episode (multi-turn envs)."""
    rounds_schedule: list[list[int]] = Field(default_factory=list)
    """ScalingInter-RL style [[step, max_rounds], ...]: max_rounds grows once training reaches each step."""
    max_total_tokens: int = Field(4096, ge=1)
    """Agent episodes whose tokens (prompt + every action and observation) exceed this are dropped, not cut."""


class Config(Section):
    experiment_name: str = "gsm8k_tiny"
    """Name of the run: outputs go to <checkpoint.save_dir>/<experiment_name>/."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=InProcessSyncConfig)
    """How new weights reach the engine (`kind`: inprocess, disk or nccl; `weight_sync: disk` is short for
    `weight_sync: {kind: disk}`)."""

    @field_validator("weight_sync", mode="before")
    @classmethod
    def _sync_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sync_reaches_engine(self) -> Config:
        backend, kind = self.rollout.backend, self.weight_sync.kind
        if kind not in SYNC_OF_BACKEND[backend]:
            fits = " or ".join(SYNC_OF_BACKEND[backend])
            raise ValueError(f"weight_sync.kind={kind} does not reach rollout.backend={backend}: use {fits}")
        return self

    @property
    def exp_dir(self) -> Path:
        return Path(self.checkpoint.save_dir) / self.experiment_name


class ConfigError(ValueError):
    """A config problem, worded for one line on the command line."""


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo, str | None]]:
    """Every key of the config tree with its field; keys of a union variant (weight_sync's kinds) come once per
    variant, with the variant's kind. The one walk of the tree: valid keys, `--help` and the tests read it."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        variants = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from config_fields(ann, f"{prefix}{name}.")
        elif variants:  # a discriminated union: the section itself (the shorthand), then every variant's keys
            yield f"{prefix}{name}", info, None
            for variant in variants:
                kind = get_args(variant.model_fields["kind"].annotation)[0]
                for key, sub, _ in config_fields(variant, f"{prefix}{name}."):
                    yield key, sub, kind
        else:
            yield f"{prefix}{name}", info, None


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    return list(dict.fromkeys(key for key, _, _ in config_fields(model, prefix)))


def unknown_key(key: str) -> str:
    """One line for a key that is not in the config: a near miss, then the valid keys of its section only."""
    if key.startswith("train.weight_sync"):
        return (
            f"{key}: the train.weight_sync* keys became the weight_sync section (weight_sync=disk, weight_sync.port=…)"
        )
    keys = valid_keys()
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    guess = difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or [
        leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.8)
    ]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    if guess and not key.startswith(guess[0].rsplit(".", 1)[0] + "."):
        section = guess[0].rsplit(".", 1)[0] + "."
    siblings = [k.removeprefix(section) for k in keys if section and k.startswith(section)]
    where = (
        f"keys of {section[:-1]}: {', '.join(siblings)}"
        if siblings
        else (
            f"top-level keys: {', '.join(sorted({k.split('.')[0] for k in keys}))} (python -m trainer --help lists all)"
        )
    )
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return f"unknown key {key!r}; {hint}{where}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if isinstance(node.get(part), str):  # a section given by its kind (weight_sync=nccl), then one of its keys
            node[part] = {"kind": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=1e-6")
        key, raw = item.split("=", 1)
        if key not in valid_keys():
            raise ConfigError(unknown_key(key))
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), str):  # a preset's `weight_sync: disk`, then its keys
            out[k] = {"kind": out[k]}
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _explain(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p not in _KINDS)
    kind = next((p for p in first["loc"] if p in _KINDS), None)
    if first["type"] == "extra_forbidden" and kind:
        keys = [k.removeprefix("weight_sync.") for k in valid_keys(_VARIANTS[kind], "weight_sync.")]
        return f"{where} is not a setting of weight_sync.kind={kind} (its keys: {', '.join(keys)})"
    if first["type"] == "extra_forbidden":
        return unknown_key(where)
    if not where:  # a cross-field check: its message names the fields
        return first["msg"].removeprefix("Value error, ")
    return f"{where}: {first['msg']} (got {first.get('input')!r})"


# pydantic names a union variant by its tag in error locations
_VARIANTS = {"inprocess": InProcessSyncConfig, "disk": DiskSyncConfig, "nccl": NcclSyncConfig}
_KINDS = tuple(_VARIANTS)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML preset (optional) + key=value overrides → validated Config, or ConfigError with one line."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found (presets live in configs/, e.g. configs/gsm8k_tiny.yaml)")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
