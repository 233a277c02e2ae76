"""The embedded rollout engine: batched generation on PyTorch with a static KV cache, in the trainer's process.

One `generate` call expands every prompt n times, left-pads the batch (each row has its own position ids), runs each
distinct prompt once in one forward pass (its rows copy its KV cache), then decodes one token per step for every row
until all rows hit a stop token or their cap (`max_new_tokens`, one for all or one per prompt). On CUDA the decode
steps (forward + sampling + logprob + stop bookkeeping) replay as CUDA graphs of `CHECK_EVERY` steps, one host check
for finished rows between two (fused Triton kernels: `rollout/kernels.py`); on CPU the same step runs eagerly.

Weights: `EmbeddedEngine(path)` loads an HF safetensors folder; `EmbeddedEngine.from_module(hf_model)` shares the
trainer's live parameters when dtype and device match (no copy: an optimizer step is seen by the next generation),
else keeps its own copy that `update_weights` refreshes in place. On CUDA the fused path always keeps its own copy,
packed for fewer GEMMs (q/k/v, gate/up); refreshing it costs ~6 ms for 0.4 B params on an H100, while decoding the
trainer's unpacked live weights with plain torch ops is ~2.8x slower per rollout (bench/RESULTS.md). Llama, Qwen2, Qwen3 and Mistral (no sliding
window) architectures are supported (`rollout/model.py`).
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollout.api import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams, ServedEngine, prompt_caps
from rollout.defaults import default_dtype, eos_ids_of_folder, eos_ids_of_module
from rollout.model import CausalLM, LoadPlan, ModelConfig, alias_parameters, load_folder, load_state
from rollout.sampling import sample, truncate


def _fused_ok(device: torch.device, cfg: ModelConfig, fused: bool) -> bool:
    """The fused Triton decode path: CUDA, Triton importable, no per-head q/k norm (Qwen3 decodes unfused)."""
    if not fused or device.type != "cuda" or cfg.qk_norm:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# compaction halves a batch (b, b/2, b/4, ... 8 rows): the whole ladder stays cached with its graphs, or every call
# would capture it again (one ladder's KV caches add up to less than twice its largest's); 12 holds two ladders
_MAX_RUNNERS_COMPACT = 12


# decode steps between two host checks for finished rows on CUDA, and the steps one graph replay runs: each replay
# boundary is a gap in the GPU's chain of dependent launches (bench/RESULTS.md)
CHECK_EVERY = 16

# On CUDA a batch's prompt slots are rounded up to a multiple of PREFILL_ALIGN (more left padding), so prefills of
# similar lengths share a shape, and a prefill of at most PREFILL_GRAPH_TOKENS tokens (distinct prompts x slots)
# replays as a CUDA graph once its shape has been seen twice: eagerly, W's prefill is ~1,000 launches that keep the
# host busy ~3x longer than the GPU (bench/phases.py --profile, bench/RESULTS.md); above the bound the GPU's work
# dominates and a graph would pin that much activation memory. A runner keeps PREFILL_GRAPHS of them: they share one
# memory pool (they never run at once), so more graphs cost their static inputs, not activations; a capture costs
# ~0.25 s (bench/grpo_step.py), so the bound is set above the prompt-length buckets a training run meets.
PREFILL_ALIGN = 16
PREFILL_GRAPH_TOKENS = 8192
PREFILL_GRAPHS = 16


def _prompt_slots(prompts: list[list[int]], cuda: bool) -> int:
    """Cache slots a batch's left-padded prompts take."""
    p = max(map(len, prompts))
    return _round_up(p, PREFILL_ALIGN) if cuda else p


def _ladder(b_cap: int, live: int) -> int:
    """The smallest capacity of the halving ladder below `b_cap` that holds `live` rows (at least 8)."""
    while b_cap // 2 >= max(live, 8):
        b_cap //= 2
    return b_cap


class _HostOutputs:
    """A runner's tokens and logprobs on their way to per-row Python lists while it decodes. At each host check the
    columns written since the last one are copied into pinned memory on a side stream (after the steps that write
    them, beside the steps after them: no gap in the decode's chain), and they become lists at a later check, while
    the GPU runs on; a batch's end then has only its last columns left to turn (W's rollout spent 1.3-1.9 ms of host
    time on all of them after the GPU's end, bench/RESULTS.md)."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor):
        cuda = tokens.is_cuda
        self.src = (tokens, logprobs)
        self.host = tuple(torch.empty(t.numel(), dtype=t.dtype, pin_memory=cuda) for t in self.src)
        self.stream = torch.cuda.Stream(tokens.device) if cuda else None
        self.reset(0)

    def reset(self, rows: int, lists: tuple[list, list] | None = None, cols: int = 0) -> None:
        """Rows 0..rows-1 start from `lists` (per-row tokens, logprobs) holding columns 0..cols-1, else empty."""
        self.rows = rows
        self.lists = lists if lists is not None else ([[] for _ in range(rows)], [[] for _ in range(rows)])
        self.listed = self.queued = cols  # columns in the lists / queued to the host
        self.offset, self.blocks = 0, []

    def queue(self, upto: int) -> None:
        """Copy columns queued .. upto-1 of the loaded rows to the host after the work queued so far (one block)."""
        if upto <= self.queued or not self.rows:
            return
        shape, landed = (self.rows, upto - self.queued), None
        with self._beside():
            for src, host in zip(self.src, self.host, strict=True):
                dst = host[self.offset : self.offset + shape[0] * shape[1]].view(shape)
                dst.copy_(src[: self.rows, self.queued : upto].contiguous(), non_blocking=True)
            if self.stream is not None:
                landed = torch.cuda.Event()
                landed.record(self.stream)
        self.blocks.append((self.offset, shape, landed))
        self.offset += shape[0] * shape[1]
        self.queued = upto

    @contextmanager
    def _beside(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield

    def to_lists(self, wait: bool = False) -> None:
        """Append the blocks that reached the host (all of them, waiting for them, with `wait`) to the lists."""
        while self.blocks:
            offset, shape, landed = self.blocks[0]
            if landed is not None:
                if not (wait or landed.query()):
                    return
                landed.synchronize()
            self.blocks.pop(0)
            for lists, host in zip(self.lists, self.host, strict=True):
                block = host[offset : offset + shape[0] * shape[1]].view(shape).tolist()
                for row, part in zip(lists, block, strict=True):
                    row.extend(part)
            self.listed += shape[1]


class _Runner:
    """Device state of one decoding batch of capacity (b_cap rows, t_cap cache slots): KV cache, last tokens,
    outputs, stop flags, and the counters `ctr = [slot of the next input, column of the next output]`.

    On CUDA a runner outlives the call: `load` refills its buffers in place, so the decode step captured as a CUDA
    graph (`capture`) replays for any later batch of the same capacity and sampling mode. `step` reads only tensors
    held here. On CPU the step runs eagerly and attention reads only the slots written so far.
    """

    def __init__(self, engine: EmbeddedEngine, b_cap: int, t_cap: int, mode: tuple, nstop: int):
        self.model, self.mode, self.b_cap, self.t_cap = engine.model, mode, b_cap, t_cap
        self.fast, self.cuda = engine.fast, engine.device.type == "cuda"
        self.stream = engine._stream
        dev = self.dev = engine.device
        self.k_cache, self.v_cache = self.model.new_cache(b_cap, t_cap)
        self._state(b_cap, nstop)
        self.tokens = torch.zeros((b_cap, t_cap), dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((b_cap, t_cap), dtype=torch.float32, device=dev)
        self.out = _HostOutputs(self.tokens, self.logprobs)
        self.done = torch.zeros(b_cap, dtype=torch.int8 if self.cuda else torch.bool, device=dev)
        self.last = torch.zeros(b_cap, dtype=torch.long, device=dev)
        self.temperature = torch.ones((), device=dev)
        self.top_p = torch.ones((), device=dev)
        self.one = torch.ones((), device=dev)
        self.live_host = torch.zeros((), dtype=torch.long, pin_memory=self.cuda)  # `_count_live`'s, read without a sync
        self.generator = torch.Generator(dev)
        self.cos, self.sin = self.model.rope_tables(t_cap) if self.fast else (None, None)
        self.graph: torch.cuda.CUDAGraph | None = None  # one step
        self.chunk: torch.cuda.CUDAGraph | None = None  # CHECK_EVERY steps
        self.prompts: tuple[torch.Tensor, torch.Tensor] | None = None  # distinct prompts [U, p] and their pad lengths
        # (U, p) -> its static inputs and graph (None until captured), and how often each shape was seen
        self.prefills: OrderedDict[tuple[int, int], tuple[tuple, torch.cuda.CUDAGraph | None]] = OrderedDict()
        self.seen: dict[tuple[int, int], int] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.cuda and engine.cuda_graphs else None
        self.pad, self.p, self.rows = 0, 1, 0

    def _state(self, b_cap: int, nstop: int) -> None:
        """The integers `load` sets for a batch, as views into one buffer that one copy from pinned memory fills:
        src (each row's prompt among the distinct ones), pad_len, limit (each row's new-token cap), idle (rows past
        the loaded ones), stop (ids, -1 padded), ctr, seed. Each view starts 16-byte aligned, as kernels' pointers
        are specialized."""
        sizes = dict(src=b_cap, pad_len=b_cap, limit=b_cap, idle=b_cap, stop=nstop, ctr=2, seed=1)
        self.state = torch.zeros(sum(_round_up(n, 2) for n in sizes.values()), dtype=torch.long, device=self.dev)
        self.staged = torch.zeros(self.state.shape, dtype=torch.long, pin_memory=self.cuda)
        offset = 0
        for name, n in sizes.items():
            setattr(self, name, self.state[offset : offset + n])
            offset += _round_up(n, 2)
        self.seed = self.seed[0]

    def load(
        self, prompts: list[list[int]], caps: list[int], params: SamplingParams, stop: list[int], seed: int
    ) -> None:
        """Left-pad the distinct `prompts` for the prefill, each row capped at its `caps` entry (rows beyond them
        are idle: done from the start, prompt 0's cache), and reset the state."""
        self.rows, self.p, self.pad = len(prompts), _prompt_slots(prompts, self.cuda), stop[0]
        index: dict[tuple[int, ...], int] = {}
        src = [index.setdefault(tuple(prompt), len(index)) for prompt in prompts] + [0] * (self.b_cap - self.rows)
        pads = [self.p - len(prompt) for prompt in index]
        ids = torch.tensor([[self.pad] * k + list(prompt) for prompt, k in zip(index, pads, strict=True)])
        pad_u = torch.tensor(pads)
        self.prompts = self._prefill_inputs(ids.shape)
        for buf, val in zip(self.prompts, (ids, pad_u), strict=True):
            buf.copy_(val, non_blocking=True)
        idle = self.b_cap - self.rows
        values = dict(
            src=src, pad_len=[pads[u] for u in src], limit=caps + [1] * idle, idle=[0] * self.rows + [1] * idle,
            stop=stop + [-1] * (self.stop.numel() - len(stop)), ctr=[self.p, 0], seed=[seed],
        )  # fmt: skip
        staged: list[int] = []
        for val in values.values():
            staged += val + [0] * (len(val) % 2)  # `_state`'s alignment gaps
        self.staged.copy_(torch.tensor(staged))
        self.state.copy_(self.staged, non_blocking=True)
        self.done.copy_(self.idle)
        self.tokens.fill_(self.pad)
        self.temperature.fill_(max(params.temperature, 1e-6))
        self.top_p.fill_(params.top_p)
        self.generator.manual_seed(seed)
        self.params = params
        self.out.reset(self.rows)

    def _prefill_inputs(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, pad lengths) buffers for distinct prompts of `shape`: a graph-able shape's own static ones."""
        dev = self.dev
        fresh = (torch.empty(shape, dtype=torch.long, device=dev), torch.empty(shape[0], dtype=torch.long, device=dev))
        if self.pool is None or shape.numel() > PREFILL_GRAPH_TOKENS:
            return fresh
        key = tuple(shape)
        if key not in self.prefills:
            if len(self.prefills) >= PREFILL_GRAPHS:
                self.prefills.popitem(last=False)
            self.prefills[key] = (fresh, None)
        self.prefills.move_to_end(key)
        return self.prefills[key][0]

    def prefill(self, max_tokens: int = 32768) -> bool:
        """Run the distinct prompts (row chunks of at most `max_tokens` tokens), give every row its prompt's cache,
        draw the first token; replayed as a graph when this shape has one, captured the second time it is seen
        (returns whether it was captured now)."""
        key = tuple(self.prompts[0].shape)
        inputs, graph = self.prefills.get(key, (None, None))
        if graph is not None:
            graph.replay()
            return False
        self._prefill(max_tokens)
        self.seen[key] = self.seen.get(key, 0) + 1
        if inputs is None or self.seen[key] < 2:
            return False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            self._prefill(max_tokens)
        self.prefills[key] = (inputs, graph)
        return True

    def _prefill(self, max_tokens: int) -> None:
        ids, pad_u = self.prompts
        u, p = ids.shape
        slots = torch.arange(p, device=ids.device)
        kc, vc = self.model.new_cache(u, p)
        rows = max(1, max_tokens // p)
        logits = []
        for r in range(0, u, rows):
            st = self.model.make_step(slots, pad_u[r : r + rows], p)
            logits.append(self.model(ids[r : r + rows], st, kc[:, r : r + rows], vc[:, r : r + rows]))
        for layer in range(kc.shape[0]):  # a layer at a time: the rows' copy of the prompts' cache stays small
            self.k_cache[layer, :, :, :p].copy_(kc[layer, self.src])
            self.v_cache[layer, :, :, :p].copy_(vc[layer, self.src])
        self.record(torch.cat(logits)[self.src])
        self.ctr[1] += 1

    def step(self) -> None:
        """Feed the last drawn tokens at slot ctr[0], draw the next ones into column ctr[1], bump both."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def _step(self) -> None:
        if self.fast:
            logits = self.model.decode_fast(
                self.last, self.ctr, self.pad_len, self.k_cache, self.v_cache, self.cos, self.sin
            )
        else:
            kv_len = self.t_cap if self.cuda else int(self.ctr[0]) + 1  # CPU: only the slots written so far
            st = self.model.make_step(self.ctr[:1], self.pad_len, kv_len)
            logits = self.model(self.last[:, None], st, self.k_cache, self.v_cache)
        self.record(logits)
        self.ctr += 1

    def record(self, logits: torch.Tensor) -> None:
        greedy, top_k, truncated = self.mode
        if self.cuda:
            from rollout.kernels import sample_rows

            draw = truncate(logits.float() / self.temperature, self.top_p, top_k) if truncated else None
            temp = self.one if truncated else self.temperature
            sample_rows(
                logits, draw, temp, self.seed, self.ctr, self.done, self.stop, self.limit,
                self.tokens, self.logprobs, self.last, self.pad, greedy,
            )  # fmt: skip
            return
        top_p = self.top_p if self.params.top_p < 1.0 else 1.0
        tok, lp = sample(logits, self.temperature, top_p, top_k, greedy, self.generator)
        tok = tok.masked_fill(self.done, self.pad)
        col = self.ctr[1:]
        self.tokens.index_copy_(1, col, tok[:, None])
        self.logprobs.index_copy_(1, col, lp.masked_fill(self.done, 0.0)[:, None])
        self.done |= torch.isin(tok, self.stop) | (self.limit <= self.ctr[1] + 1)  # a stop token, or the cap
        self.last.copy_(tok)

    def capture(self) -> None:
        """Record `step` (forward + sampling + bookkeeping + counter bump) as a CUDA graph, and CHECK_EVERY of them as
        a second one, after two warm-up runs on the idle state (they compile the kernels). `load` resets everything
        the warm-up touched."""
        with torch.cuda.stream(self.stream):  # a side stream, as warm-up before a capture wants
            for _ in range(2):
                self._step()
        self.graph = self._record(1)
        self.chunk = self._record(CHECK_EVERY)

    def _record(self, steps: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: with async rollout a learner thread keeps allocating and syncing while a new runner captures;
        # the default ("global") would make those calls fail during the capture. Captured on the engine's stream: the
        # graph's kernels then run where that stream runs (a green context's SMs, bench/sm_share.py)
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            for _ in range(steps):
                self._step()
        return graph

    def decode(self, n: int, check_every: int, start: int = 1, shrink_at: int = 0) -> int:
        """Decode from step `start` until `n` tokens (returns n), or until at most `shrink_at` loaded rows still
        decode, or none (returns the step reached: the caller compacts, or collects only the columns written; a batch
        whose rows all stopped early leaves the rest of its columns on the device); a host check only every
        `check_every` steps, between which a captured runner replays its CHECK_EVERY-step graph where it fits.

        Look-ahead: where the rows left at the last check, less the most that ever stopped between two checks, are
        still above `shrink_at`, the next graph is queued before this check's count is read, so the GPU does not
        idle while the host reads it (W's rollout: ~60 us per check, bench/RESULTS.md). A wrong guess costs one
        graph of steps on rows that stopped (their tokens are pad, past their stop), never a result."""
        s, seen, drop = start, None, 0
        while s < n:
            if s % check_every == 0:
                graph = self.chunk is not None and check_every == CHECK_EVERY and s + CHECK_EVERY <= n
                if self.cuda:  # the columns that reached the host become lists while the GPU runs on
                    self.out.to_lists()
                    self.out.queue(s)
                count = self._count_live()
                ahead = graph and seen is not None and seen - drop > shrink_at
                if ahead:
                    self.chunk.replay()
                    s += CHECK_EVERY
                live = count()
                if ahead:  # the GPU has the next graph
                    self.out.to_lists()
                seen, drop = live, drop if seen is None else max(drop, seen - live)
                if live <= shrink_at:
                    return s
                if ahead:
                    continue
                if graph:
                    self.chunk.replay()
                    s += CHECK_EVERY
                    continue
            self.step()
            s += 1
        return n

    def _count_live(self):
        """Queue a count of the loaded rows still decoding; returns a function that waits for it (for this count
        only, not for work queued after it) and returns it."""
        count = (self.done[: self.rows] == 0).sum()
        if not self.cuda:
            return lambda: int(count)
        self.live_host.copy_(count, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()

        def read() -> int:
            ready.synchronize()
            return int(self.live_host)

        return read

    def adopt(self, src: _Runner, rows: list[int]) -> None:
        """Take over `src`'s loaded rows `rows` (a compaction): their KV cache, outputs, caps, stop state and the
        counters land in rows 0..len(rows)-1, the rest idle. Slots and columns keep their numbers (t_cap >= src's);
        only the cache slots written so far are copied (after a batch's first ~100 steps, a tenth of W2's t_cap)."""
        m, t, idx = len(rows), src.t_cap, torch.tensor(rows, device=src.done.device)
        slots = int(src.ctr[0])
        self.rows, self.p, self.pad, self.params = m, src.p, src.pad, src.params
        self.k_cache[:, :m, :, :slots].copy_(src.k_cache[:, idx, :, :slots])
        self.v_cache[:, :m, :, :slots].copy_(src.v_cache[:, idx, :, :slots])
        for name, idle in (("done", 1), ("limit", 1), ("pad_len", 0), ("last", src.pad), ("tokens", src.pad)):
            mine, theirs = getattr(self, name), getattr(src, name)
            mine.fill_(idle)
            mine[:m, ...][..., : theirs.shape[-1]].copy_(theirs[idx])
        self.logprobs.zero_()
        self.logprobs[:m, :t].copy_(src.logprobs[idx])
        for name in ("stop", "ctr", "temperature", "top_p", "seed"):
            getattr(self, name).copy_(getattr(src, name))
        self.generator.set_state(src.generator.get_state())
        self.out.reset(m, tuple([every[i] for i in rows] for every in src.out.lists), src.out.listed)

    def results(self, cols: int, rows: list[int]) -> list[tuple[list[int], list[float], str]]:
        """Loaded rows `rows`: tokens up to and including the first stop token within the row's cap, their logprobs,
        the finish reason; `cols`: the columns written so far. Every loaded row's columns reach its host lists
        (`_HostOutputs`: a compaction's moved rows take theirs along), with one wait for the GPU."""
        tokens, limit = self.tokens[: self.rows, :cols], self.limit[: self.rows]
        is_stop = torch.isin(tokens, self.stop) & (torch.arange(cols, device=tokens.device) < limit[:, None])
        has_stop = is_stop.any(1)
        length = torch.where(has_stop, is_stop.int().argmax(1) + 1, limit.clamp(max=cols))
        ends = torch.stack((length, has_stop.long()), 1).to("cpu", non_blocking=True)
        self.out.queue(cols)
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        self.out.to_lists(wait=True)
        ends, (tok, lp) = ends.tolist(), self.out.lists
        out = []
        for i in rows:
            k, stopped = ends[i]
            del tok[i][k:], lp[i][k:]
            out.append((tok[i], lp[i], FINISH_STOP if stopped else FINISH_LENGTH))
        return out


class EmbeddedEngine(ServedEngine):
    """In-process generation backend (see the module docstring).

    device: "cpu" or "cuda[:i]"; dtype: default bfloat16 on CUDA, float32 on CPU; max_batch_size: most sequences
    decoded at once (bigger requests run in several batches); eos_token_ids: default from the model's
    generation_config / config; cuda_graphs: replay decode steps (and small recurring prefills) as CUDA graphs on GPU,
    captured in a generate call when a batch shape is new (`captures` counts them; while one is captured, another
    thread must not synchronize the whole device: sync its own stream); seed: seeds the engine's
    generator, used when `SamplingParams.seed` is None; compact: once at most half of a batch's rows still decode,
    move them into the smallest batch of the halving ladder (b/2, b/4, ... rows, at least 8) that holds them, so
    finished rows stop costing work (bench/w2.py on an H200: x2.9 faster than the static batch on a realistic spread
    of lengths, for up to twice the KV-cache memory; sampled tokens then come from other random streams, greedy ones
    are the same).
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
        fused: bool = True,
        compact: bool = True,
    ):
        dtype = dtype or default_dtype(device)
        cfg = ModelConfig.from_folder(model_path)
        model = CausalLM.empty(cfg, device, dtype)
        load_folder(model, model_path)
        eos = eos_ids_of_folder(model_path) if eos_token_ids is None else eos_token_ids
        self._setup(model, eos, max_batch_size, cuda_graphs, seed, fused, compact)

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
        fused: bool = True,
        compact: bool = True,
    ) -> EmbeddedEngine:
        """An engine over an HF causal LM's weights: aliased (no copy) when `dtype`/`device` match the module's
        parameters and the fused CUDA path is off, else a copy (refresh it with `update_weights(hf_model)` after
        each optimizer step). `engine.aliased` says which. dtype default: bfloat16 on CUDA, float32 on CPU."""
        device = torch.device(device or next(hf_model.parameters()).device)
        dtype = dtype or default_dtype(device)
        cfg = ModelConfig.from_hf(hf_model.config.to_dict())
        with torch.device("meta"):
            model = CausalLM(cfg)
        aliased = not _fused_ok(device, cfg, fused) and alias_parameters(model, hf_model, device, dtype)
        if not aliased:
            model = CausalLM.empty(cfg, device, dtype)
            with torch.no_grad():
                load_state(model, hf_model.state_dict())
        model.init_rope(device)
        self = cls.__new__(cls)
        eos = eos_ids_of_module(hf_model) if eos_token_ids is None else eos_token_ids
        self._setup(model.eval(), eos, max_batch_size, cuda_graphs, seed, fused, compact)
        self._source = hf_model if aliased else None
        return self

    def _setup(
        self,
        model: CausalLM,
        eos: list[int],
        max_batch_size: int,
        cuda_graphs: bool,
        seed: int,
        fused: bool,
        compact: bool,
    ) -> None:
        if not eos:
            raise ValueError("no EOS token id: pass eos_token_ids (the model config names none)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.cfg = model, model.cfg
        self.device, self.dtype = model.device, model.dtype
        self._group = None  # the trainer's weight-sync group, once joined
        self.eos_token_ids = [int(e) for e in eos]
        self.max_batch_size = max_batch_size
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.fast = _fused_ok(self.device, self.cfg, fused)
        if self.fast:
            model.pack_()
        self.seed, self.compact = seed, compact
        self.compactions = 0  # batches moved into a smaller one (compact=True)
        self.captures = 0  # CUDA graphs captured (each costs about one eager run of what it holds, and a GC pass)
        self._generator = torch.Generator().manual_seed(seed)  # draws each call's seed when params.seed is None
        self._runners: OrderedDict[tuple, _Runner] = OrderedDict()
        self._lock = threading.RLock()
        # the engine's own CUDA stream (not the default one): a learner on the default stream in another thread
        # (async rollout) then overlaps a generation on the GPU instead of queueing behind it, or it behind the
        # learner. At the highest priority the decode's short kernels take SMs first as the learner's GEMM blocks
        # retire, and the learner fills the rest (W's async step on an H200 x1.015, bench/RESULTS.md)
        self._stream = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device, priority=min(torch.cuda.Stream.priority_range()))
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # loading and packing the weights
        self._version = 0
        self._source: nn.Module | None = None
        # source module -> how its parameters map onto ours (a trainer pushes the same module every step)
        self._plans: weakref.WeakKeyDictionary[nn.Module, LoadPlan] = weakref.WeakKeyDictionary()

    @contextmanager
    def _on_stream(self, after_caller: bool):
        """Queue the enclosed GPU work on the engine's stream; the caller's stream waits for it at the end (so what
        the caller queues next, e.g. an optimizer step over a source the engine copied from, comes after). With
        `after_caller` the work also waits for what the caller queued before (new source weights; an aliased engine
        reads the trainer's parameters) - a generation of an engine with its own weights does not, so it overlaps a
        learner's queued work."""
        if self._stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        if after_caller:
            self._stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            caller.wait_stream(self._stream)

    @property
    def aliased(self) -> bool:
        """True when the engine reads the source module's live parameters (no copy)."""
        return self._source is not None

    @property
    def weight_version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: list[int] | None = None
    ) -> list[Completion]:
        """`len(prompts) * params.n` completions, all n of prompt 0 first. Each Completion's `logprobs` are those of
        its tokens under the unmodified policy (temperature 1, no top-p/top-k), as GRPO's ratio needs; a stop token
        (model EOS or `params.stop_token_ids`) ends a row and is included (finish_reason "stop"), else "length".
        `max_new_tokens` caps each prompt's rows on its own (rollout.api.prompt_caps); a batch decodes until its
        longest cap at most."""
        prompts = self._check_prompts(prompts)
        caps = prompt_caps(prompts, params, max_new_tokens)
        stop = self._stop_ids(params)
        longest = max(len(p) + c for p, c in zip(prompts, caps, strict=True))
        if longest > self.cfg.max_position_embeddings:
            raise ValueError(
                f"longest prompt + max_new_tokens = {longest} exceeds the model's max_position_embeddings "
                f"({self.cfg.max_position_embeddings}): shorten the prompt or lower max_new_tokens"
            )
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]
        out: list[Completion] = []
        with self._lock, torch.inference_mode(), self._on_stream(after_caller=self.aliased):
            seeds = torch.Generator().manual_seed(self._call_seed(params))
            for start in range(0, len(rows), self.max_batch_size):
                idx = rows[start : start + self.max_batch_size]
                chunk, chunk_caps = [prompts[i] for i in idx], [caps[i] for i in idx]
                new = max(chunk_caps)
                runner = self._runner(
                    len(chunk), _prompt_slots(chunk, self.device.type == "cuda") + new, params, len(stop)
                )
                runner.load(chunk, chunk_caps, params, stop, int(torch.randint(2**62, (1,), generator=seeds)))
                self.captures += runner.prefill()
                out += [
                    Completion(prompts[i], tok, lp, fin, self._version, i)
                    for i, (tok, lp, fin) in zip(idx, self._decode(runner, new, len(stop)), strict=True)
                ]
        return out

    def _decode(self, runner: _Runner, n: int, nstop: int) -> list[tuple[list[int], list[float], str]]:
        """Decode a prefilled batch to its end; per loaded row (tokens, logprobs, finish reason). With `compact`, the
        rows still decoding move into a smaller runner each time at most half the batch's rows are left."""
        check, owners, step = CHECK_EVERY if runner.cuda else 1, list(range(runner.rows)), 1
        results: list = [None] * runner.rows
        while True:
            shrink = runner.b_cap // 2 if self.compact and runner.b_cap // 2 >= 8 else 0
            step = runner.decode(n, check, start=step, shrink_at=shrink)
            live = [] if step >= n else (runner.done[: runner.rows] == 0).nonzero()[:, 0].tolist()
            decoding = set(live)
            finished = [i for i in range(runner.rows) if i not in decoding]
            for i, row in zip(finished, runner.results(min(step, n), finished), strict=True):
                results[owners[i]] = row
            if not live:
                return results
            small = self._runner(_ladder(runner.b_cap, len(live)), runner.t_cap, runner.params, nstop)
            small.adopt(runner, live)
            owners, runner = [owners[i] for i in live], small
            self.compactions += 1

    def _call_seed(self, params: SamplingParams) -> int:
        if params.seed is not None:
            return params.seed
        return int(torch.randint(2**62, (1,), generator=self._generator))

    def _runner(self, rows: int, length: int, params: SamplingParams, nstop: int) -> _Runner:
        """A runner for this batch. On CUDA runners are kept (at most 2, most recent first) with their captured
        graphs and reused by later batches of the same row capacity and sampling mode with room for `length`."""
        mode = (params.greedy, params.top_k, params.top_p < 1.0)
        if self.device.type != "cuda":
            return _Runner(self, rows, length, mode, nstop)
        b_cap, nstop = _round_up(rows, 8), max(16, nstop)
        for key, runner in self._runners.items():
            if key[0] == b_cap and key[2:] == (mode, nstop) and key[1] >= length:
                self._runners.move_to_end(key, last=False)
                return runner
        while len(self._runners) >= (_MAX_RUNNERS_COMPACT if self.compact else 2):
            self._runners.popitem()
            torch.cuda.empty_cache()
        runner = _Runner(self, b_cap, _round_up(length, 64), mode, nstop)
        if self.cuda_graphs:
            runner.capture()
            self.captures += 2
        self._runners[(b_cap, runner.t_cap, mode, nstop)] = runner
        self._runners.move_to_end((b_cap, runner.t_cap, mode, nstop), last=False)
        return runner

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
        with self._lock, torch.inference_mode(), self._on_stream(after_caller=True):
            if isinstance(source, nn.Module) and source is self._source:
                alias_parameters(self.model, source, self.device, self.dtype)  # picks up replaced Parameter objects
            else:
                self._own_weights()
                if isinstance(source, nn.Module):
                    self._plan_for(source).run()
                elif isinstance(source, dict):
                    load_state(self.model, source)
                elif isinstance(source, str | Path):
                    load_folder(self.model, source)
                else:
                    raise TypeError(f"update_weights takes an nn.Module, a state dict or a folder, not {type(source)}")
            self._version = self._version + 1 if version is None else int(version)
            return self._version

    def _plan_for(self, source: nn.Module) -> LoadPlan:
        """How `source`'s parameters fill ours: the plan of the last push from it while it still holds the same
        Parameter objects (one replaced, added or removed makes a new plan). Sharded (DTensor) parameters are
        gathered anew each time: no plan is kept for them."""
        params = dict(source.named_parameters(remove_duplicate=False))
        plan = self._plans.get(source)
        if (
            plan is not None
            and len(plan.sources) == len(params)
            and all(map(operator.is_, plan.sources, params.values()))
        ):
            return plan
        if any(hasattr(p, "full_tensor") for p in params.values()):
            return LoadPlan(self.model, params)
        plan = self._plans[source] = LoadPlan(self.model, params)
        return plan

    def _own_weights(self) -> None:
        """Stop aliasing: give the engine private copies of the shared parameters."""
        if self._source is None:
            return
        self._plans.clear()  # their targets are about to be replaced
        for name, p in list(self.model.named_parameters()):
            mod_name, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(mod_name), attr, nn.Parameter(p.detach().clone(), requires_grad=False))
        if self.cfg.tie_word_embeddings:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self._source = None

    # ---- weight sync from the trainer's group (the rollout service calls these; see rollout/weight_transfer.py)

    def init_weight_sync(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        from rollout.weight_transfer import SyncGroup

        self.close_weight_sync()
        self._group = SyncGroup.join(host, port, rank_offset, world_size, backend, timeout_s)

    def receive_weights(self, manifest: list[dict], bucket_bytes: int, version: int | None) -> int:
        from rollout.payloads import WeightSyncError
        from rollout.weight_transfer import receive_weights

        if self._group is None:
            raise WeightSyncError("no weight-sync group: POST /init_weight_sync first")
        return self.update_weights(dict(receive_weights(self._group, manifest, bucket_bytes)), version)

    def close_weight_sync(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def weights_checksum(self) -> str:
        from rollout.weight_transfer import checksum

        with self._lock, self._on_stream(after_caller=False):
            return checksum(self.model.named_parameters())

    def close(self) -> None:
        with self._lock:
            self._runners.clear()
            self.model = None  # type: ignore[assignment]
            self._source = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
