"""A compact decoder for the Llama / Qwen2 / Qwen3 families with a static, batched KV cache.

Parameter names match transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), so HF state dicts load as they
are and the trainer's live `nn.Parameter`s can be shared with no copy (`alias_parameters`). Numerics follow the HF
reference: RMSNorm in fp32, RoPE tables in fp32 cast to the model dtype, softmax inside SDPA.

Attention is grouped-query without repeating K/V: the G query heads that share a KV head are stacked along the query
axis, so one SDPA call over [B, kv_heads, G*Lq, d] reads each cached K/V once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE = ("default", "linear", "llama3")
# wrappers that prefix parameter names: torch.compile, DDP / FSDP1, PEFT-free model parallel wrappers
_NAME_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]  # rope_type and its parameters, hashable
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read an HF `config.json` dict (transformers 4.x `rope_theta/rope_scaling` or 5.x `rope_parameters`)."""
        cfg = cfg.get("text_config", cfg)
        mtype = cfg.get("model_type", "")
        if mtype not in SUPPORTED_TYPES:
            raise ValueError(
                f"model_type {mtype!r} is not supported by the embedded engine ({', '.join(SUPPORTED_TYPES)})"
            )
        if cfg.get("use_sliding_window") or (mtype == "mistral" and cfg.get("sliding_window")):
            raise ValueError("sliding-window attention is not supported by the embedded engine")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise ValueError(f"rope_type {rope_type!r} is not supported ({', '.join(SUPPORTED_ROPE)})")
        heads = cfg["num_attention_heads"]
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mtype,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted({"rope_type": rope_type, **rope}.items())),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            qkv_bias=True if mtype == "qwen2" else attn_bias,
            o_bias=False if mtype == "qwen2" else attn_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mtype == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(json.loads((Path(path) / "config.json").read_text()))


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str) -> torch.Tensor:
    """Inverse frequencies (fp32) with the config's scaling applied, as transformers computes them."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = dict(cfg.rope_scaling)
    if rs["rope_type"] == "linear":
        inv = inv / rs["factor"]
    elif rs["rope_type"] == "llama3":
        inv = _llama3_scale(inv, rs)
    return inv


def _llama3_scale(inv: torch.Tensor, rs: dict[str, Any]) -> torch.Tensor:
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False  # one Triton launch instead of eight torch ops (`pack_`: the fused CUDA path's prefill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from rollout import kernels

            return kernels.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Step:
    """Everything one forward needs besides token ids; shared by all layers.

    `slots` [Lq]: cache slots the new tokens are written to (the same for every row: prompts are left-padded);
    `kv_len`: how many cache slots attention reads (≥ slots[-1] + 1); `cos/sin` [B, 1, Lq, d]; `mask` [B, 1, G*Lq, kv_len].
    """

    slots: torch.Tensor
    kv_len: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.h, self.kv, self.d, self.qk_norm = h, kv, d, cfg.qk_norm
        # q/k/v weights packed in one buffer (`CausalLM.pack_`): one GEMM, then q and k rotated in one launch
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, st: Step, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        b, lq, _ = x.shape
        if self.qkv_weight is not None:
            from rollout import kernels

            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            q, k = (t.transpose(1, 2) for t in kernels.rope_qk(qkv, st.cos, st.sin, self.h, self.kv))
            v = qkv[..., (self.h + self.kv) * self.d :].view(b, lq, self.kv, self.d).transpose(1, 2)
        else:
            q = self.q_proj(x).view(b, lq, self.h, self.d).transpose(1, 2)
            k = self.k_proj(x).view(b, lq, self.kv, self.d).transpose(1, 2)
            v = self.v_proj(x).view(b, lq, self.kv, self.d).transpose(1, 2)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = q * st.cos + _rotate_half(q) * st.sin
            k = k * st.cos + _rotate_half(k) * st.sin
        k_cache.index_copy_(2, st.slots, k)
        v_cache.index_copy_(2, st.slots, v)
        g = self.h // self.kv
        # query head j*g + i uses KV head j (HF's repeat_kv order): stack the g heads along the query axis
        q = q.reshape(b, self.kv, g * lq, self.d)
        out = F.scaled_dot_product_attention(
            q, k_cache[:, :, : st.kv_len], v_cache[:, :, : st.kv_len], attn_mask=st.mask, scale=self.d**-0.5
        )
        out = out.reshape(b, self.h, lq, self.d)  # SDPA may return a non-contiguous tensor (fp32 on CUDA)
        out = out.transpose(1, 2).reshape(b, lq, self.h * self.d)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        # gate/up weights packed in one buffer (`CausalLM.pack_`): one GEMM
        self.gate_up_weight: torch.Tensor | None = None
        self.gate_up_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, st: Step, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), st, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder-only LM over a caller-owned KV cache `k_cache, v_cache`: [layers, B, kv_heads, T, head_dim]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq: torch.Tensor | None = None  # fp32, set by `materialize`

    @classmethod
    def empty(cls, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> CausalLM:
        """Allocate uninitialised weights on `device` (no random init: weights are loaded right after)."""
        with torch.device("meta"):
            m = cls(cfg)
        m = m.to(dtype).to_empty(device=device)
        if cfg.tie_word_embeddings:  # to_empty re-creates parameters one by one, breaking the tie
            m.lm_head.weight = m.model.embed_tokens.weight
        m.init_rope(device)
        return m.eval().requires_grad_(False)

    def init_rope(self, device: torch.device | str) -> None:
        self.inv_freq = rope_inv_freq(self.cfg, device)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim)
        return tuple(torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(2))

    def make_step(self, slots: torch.Tensor, pad_len: torch.Tensor, kv_len: int) -> Step:
        """Positions, RoPE tables and the attention mask for writing `slots` in a left-padded batch.

        Row b's real tokens start at slot pad_len[b]; its position ids count from there. A key is visible when it is
        a real token at or before the query's slot; each query also sees its own slot, so padding queries stay finite.
        """
        pos = (slots[None, :] - pad_len[:, None]).clamp_min(0)  # [B, Lq]
        freqs = pos[..., None].float() * self.inv_freq  # [B, Lq, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, Lq, d]
        j = torch.arange(kv_len, device=slots.device)
        causal = j[None, :] <= slots[:, None]  # [Lq, kv_len]
        real = j[None, :] >= pad_len[:, None]  # [B, kv_len]
        mask = (causal[None] & real[:, None]) | (j[None, :] == slots[:, None])[None]  # [B, Lq, kv_len]
        g = self.cfg.num_heads // self.cfg.num_kv_heads
        b, lq = mask.shape[:2]
        mask = mask[:, None, None].expand(b, 1, g, lq, kv_len).reshape(b, 1, g * lq, kv_len)
        return Step(slots, kv_len, emb.cos().to(self.dtype), emb.sin().to(self.dtype), mask)

    def pack_(self) -> None:
        """Keep each layer's q/k/v and gate/up weights in one buffer (one GEMM each on the fast path) and make the
        HF-named parameters views into it, so loading weights by name fills the packed buffers: no repacking. The
        forward (the fused path's prefill) then runs the packed GEMMs and fused norms and RoPE (Triton)."""
        for norm in self.modules():
            if isinstance(norm, RMSNorm):
                norm.fused = True
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_weight = _pack(a, ("q_proj", "k_proj", "v_proj"), "weight")
            a.qkv_bias = _pack(a, ("q_proj", "k_proj", "v_proj"), "bias") if self.cfg.qkv_bias else None
            m.gate_up_weight = _pack(m, ("gate_proj", "up_proj"), "weight")
            m.gate_up_bias = _pack(m, ("gate_proj", "up_proj"), "bias") if self.cfg.mlp_bias else None

    def decode_fast(
        self,
        last: torch.Tensor,
        ctr: torch.Tensor,
        pad_len: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step on CUDA through the fused Triton kernels (needs `pack_()`): feed `last` [B] at cache slot
        ctr[0] and return the logits [B, V] in the model dtype. No host syncs: capturable as a CUDA graph."""
        from rollout import kernels as K

        c, layers = self.cfg, self.model.layers
        x = last.new_empty((last.shape[0], c.hidden_size), dtype=self.dtype)  # the residual stream, updated in place
        w, embed = layers[0].input_layernorm.weight, (last, self.model.embed_tokens.weight)
        norm = K.rms_prep(x, None, w, c.rms_norm_eps, (k_cache[0], v_cache[0], ctr, pad_len), embed)
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            qkv = K.linear(norm, a.qkv_weight, a.qkv_bias)
            attn = K.rope_attention(qkv, k_cache[i], v_cache[i], cos, sin, ctr, pad_len, c.num_heads)
            w = layer.post_attention_layernorm.weight
            norm = K.linear_residual(attn, a.o_proj.weight, a.o_proj.bias, x, w, c.rms_norm_eps)
            act = K.linear(norm, m.gate_up_weight, m.gate_up_bias, glu=True)
            w = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else self.model.norm.weight
            nxt = (k_cache[i + 1], v_cache[i + 1], ctr, pad_len) if i + 1 < len(layers) else None
            norm = K.linear_residual(act, m.down_proj.weight, m.down_proj.bias, x, w, c.rms_norm_eps, nxt, nxt is None)
        return K.linear(norm, self.lm_head.weight)  # the last layer's norm: the normalized rows

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, d/2] in the model dtype for positions 0..length-1 (fp32 math, as `make_step`)."""
        freqs = torch.arange(length, device=self.device).float()[:, None] * self.inv_freq
        return freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    def forward(
        self, ids: torch.Tensor, st: Step, k_cache: torch.Tensor, v_cache: torch.Tensor, last_only: bool = True
    ) -> torch.Tensor:
        """Logits (fp32) of the last position [B, V], or of every position [B, Lq, V] when `last_only=False`."""
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, st, k_cache[i], v_cache[i])
        if last_only:
            x = x[:, -1]
        return self.lm_head(self.model.norm(x)).float()


def _pack(module: nn.Module, names: tuple[str, ...], attr: str) -> torch.Tensor:
    parts = [getattr(getattr(module, n), attr) for n in names]
    buf = torch.cat([p.detach() for p in parts])
    offset = 0
    for name, p in zip(names, parts, strict=True):
        view = nn.Parameter(buf[offset : offset + p.shape[0]], requires_grad=False)
        setattr(getattr(module, name), attr, view)
        offset += p.shape[0]
    return buf


def strip_prefixes(name: str) -> str:
    for p in _NAME_PREFIXES:
        name = name.replace(p, "")
    return name


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 shard: gathers, every rank must call in the same order) or a tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_state(model: CausalLM, state: dict[str, torch.Tensor]) -> None:
    """Copy an HF-named state dict into `model` in place (dtype/device converted), after checking that nothing is
    missing (an incomplete dict changes no weight)."""
    LoadPlan(model, state).run()


class LoadPlan:
    """Which of `model`'s parameters each HF-named source tensor fills, worked out once: a refresh from the same
    tensors (a trainer's compute copy, updated in place every step) is then only the copies, not a walk of two
    module trees and a name match per tensor (W's push on an H200: 8 -> 2 ms). Tensors already in the model's dtype
    and device go in one batched copy (`_foreach_copy_`: a few launches for all of them, where a cast is one launch
    per tensor). Sharded (DTensor) sources are gathered when the plan is made: such a plan is good for one load."""

    def __init__(self, model: CausalLM, state: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        pairs = {}
        for name, tensor in state.items():
            name = strip_prefixes(name)
            if name in params:
                pairs[name] = (params[name], full_tensor(tensor))
        check_complete(model, pairs)
        same = [(d, s) for d, s in pairs.values() if (d.dtype, d.device) == (s.dtype, s.device)]
        self.cast = [(d, s) for d, s in pairs.values() if (d.dtype, d.device) != (s.dtype, s.device)]
        self.dst, self.src = [d for d, _ in same], [s for _, s in same]
        self.sources = tuple(state.values())
        """Every source tensor (the plan holds for as long as the source still has these very objects)."""

    def run(self) -> None:
        for dst, src in self.cast:
            dst.copy_(src)
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)


def check_complete(model: CausalLM, names) -> None:
    """ValueError unless `names` cover every parameter of `model` (a tied lm_head comes with the embeddings)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(names) - ({"lm_head.weight"} if model.cfg.tie_word_embeddings else set()))
    if missing:
        raise ValueError(f"weights are missing {len(missing)} parameters, e.g. {missing[:3]}")


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files of an HF folder: the shards named in `model.safetensors.index.json`, or `*.safetensors`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {folder}")
    return files


def load_folder(model: CausalLM, folder: str | Path) -> None:
    """Stream the weights of an HF safetensors folder into `model`, one tensor at a time (low peak memory)."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    got = set()
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in params:
                    params[key].copy_(f.get_tensor(key))
                    got.add(key)
    check_complete(model, got)


def alias_parameters(model: CausalLM, hf_model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Make `model` use `hf_model`'s Parameter objects (no copy). Returns False, changing nothing, when any of them
    is not on `device` in `dtype`, has another shape, or is sharded (DTensor)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = {strip_prefixes(n): p for n, p in hf_model.named_parameters(remove_duplicate=False)}
    for name, p in ours.items():
        src = theirs.get(name)
        if src is None and name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        if src is None or hasattr(src, "full_tensor") or (src.dtype, src.device, src.shape) != (dtype, device, p.shape):
            return False
    for name in ours:
        if name in theirs:
            mod_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, theirs[name])
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return True
