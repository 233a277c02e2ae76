"""Workload W on one GPU: rldock's rollout engine and GRPO step against HF static-cache generate and TRL's GRPOTrainer.

W (issue 3, ../shared/REFERENCE.md): Qwen2 at Qwen2.5-0.5B width/depth with vocab 49,152 (401.9 M params, random
init), bf16 compute, 8 prompts x group 8 = 64 completions x 256 new tokens, prompts of 32 tokens.

Measured in one process, each figure the median of --steps timed repetitions after --warmup untimed ones:
- rollout alone: rldock engine (fused kernels + CUDA graphs; also with cuBLAS projections and no programmatic
  dependent launch, as before issue 14, without graphs, and unfused torch ops + graphs),
  HF `generate` with a static cache, and (--vllm) vLLM's `LLM` through rollout/vllm_backend.py; completion tokens / s,
  the ratio to HF, the first call's time and the GPU memory taken (free memory before the engine - after its first
  call; vLLM's is the KV budget its gpu_memory_utilization asks for, plus its own weights and graphs);
- weight sync: fp32 master state dict -> the engine's packed bf16 copy;
- GRPO step: rldock (trainer.workflow rollout + GSM8K reward, trainer.learner.Learner.update, trainer weight sync) vs
  TRL GRPOTrainer (HF generate, no vLLM), same model folder, prompts, reward and batch; learner TFLOP/s = 6 N T / time
  with N = 401.9 M and T = 64 x 288 tokens; and rldock's step with rollout.max_staleness = 1 (the next batch is
  generated in the trainer's producer thread, on the engine's own CUDA stream, while the learner trains).

TRL is not a project dependency. On the lent GPU it was brought in as wheels (pip download trl==1.16.0 datasets
dill multiprocess --no-deps, installed with --target; see bench/RESULTS.md). Without TRL the TRL rows are skipped.

    python bench/grpo_step.py [--steps 3] [--warmup 1] [--skip-hf] [--skip-trl] [--vllm] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEVICE = "cuda"
W = dict(prompts=8, group=8, new_tokens=256, prompt_tokens=32)
QWEN05_SHAPE = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=49152, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed repetitions per figure (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before timing")
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="a 49,152-token tokenizer folder")
    p.add_argument("--workdir", default="/tmp/rldock_w", help="where the random model folder is written")
    p.add_argument("--micro-batch", type=int, default=64, help="rldock learner micro-batch (sequences)")
    p.add_argument("--skip-hf", action="store_true", help="skip HF static-cache generate")
    p.add_argument("--skip-trl", action="store_true", help="skip TRL GRPOTrainer")
    p.add_argument("--vllm", action="store_true", help="also W's rollout through vLLM (rollout/vllm_backend.py)")
    p.add_argument("--json", help="write every figure here")
    return p.parse_args()


def timed(fn, steps: int, warmup: int) -> tuple[float, list[float]]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def make_model_folder(args) -> tuple[str, object, int]:
    """Random-init W model saved as an HF folder with the tokenizer; returns (path, tokenizer, param count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rollout.loading import load_tokenizer

    path = Path(args.workdir) / "model"
    tok = load_tokenizer(args.tokenizer)  # the trainer's: a pad token even where the folder has none
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", **QWEN05_SHAPE, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok, params


def w_items(tok) -> list[dict]:
    """8 GSM8K test questions cut to exactly 32 tokens each, with their gold answers."""
    from env_servers.gsm8k import load_gsm8k

    items = []
    for i, row in enumerate(load_gsm8k(ROOT / "data/gsm8k/test.jsonl")[: W["prompts"]]):
        ids = tok(row["question"] * 4, add_special_tokens=False)["input_ids"][: W["prompt_tokens"]]
        items.append({"prompt_ids": ids, "answer": row["answer"], "index": i, "text": tok.decode(ids)})
    return items


def int_list(p: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """`option`'s comma-separated integers, or the parser's one-line usage error naming it."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"{option}: not a list of comma-separated integers: {text!r}")


def gpu_bench_parser(doc: str, what: str) -> argparse.ArgumentParser:
    """The options every W-rollout GPU bench shares (--steps: timed rollouts per `what`, --tokenizer, --json,
    --group); the caller adds its sweep option and parses with `parse_gpu_bench`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help=f"timed rollouts per {what} (median reported)")
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="a 49,152-token tokenizer folder")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--group", type=int, default=W["group"], help="completions per prompt: W's rows = 8 x this")
    return p


def parse_gpu_bench(p: argparse.ArgumentParser) -> argparse.Namespace:
    """`gpu_bench_parser`'s arguments; --group sets W's completions per prompt for every bench in this process."""
    args = p.parse_args()
    if args.group < 1:
        p.error("--group must be >= 1")
    W["group"] = args.group
    return args


def gpu_or_exit(script: str, tokenizer: str):
    """For a GPU bench over W's rollout: one line and exit without a GPU; else (tokenizer, W's items), after
    printing the GPU."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU")
    from rollout.loading import load_tokenizer

    tok = load_tokenizer(tokenizer)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    return tok, w_items(tok)


def random_model(shape: dict, tok):
    """A random-init (seed 0) Qwen2 of `shape` in fp32 on the GPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", **shape, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda()


def random_w_on_gpu(script: str, tokenizer: str):
    """`gpu_or_exit`, then the random-init W model: (tokenizer, W's items, model)."""
    tok, items = gpu_or_exit(script, tokenizer)
    return tok, items, random_model(QWEN05_SHAPE, tok)


def sweep_w_rollout(script: str, args, variants: dict) -> dict:
    """W's rollout on the random-init W model under each variant (name -> a context manager factory): the median of
    args.steps rollouts each, `best_of_rounds` (time_s, tok_s), written to args.json."""
    tok, items, model = random_w_on_gpu(script, args.tokenizer)

    def measure() -> dict:
        r = bench_engine(model, items, tok.eos_token_id, args.steps, 1)
        return {"time_s": r["time_s"], "tok_s": r["tok_s"]}

    return best_of_rounds(variants, measure, args.json)


def best_of_rounds(variants: dict, measure, json_path: str | None, rounds: int = 2) -> dict:
    """Each variant (name -> a context manager factory) measured by `measure()` (a dict with time_s) in `rounds`
    interleaved rounds (the machine drifts by a few percent between minutes); each keeps its fastest. A variant
    that raises is recorded as failed (a tiling that does not compile or fit is a result). Written to json_path
    after every measurement."""
    res: dict = {}
    for _ in range(rounds):
        for name, variant in variants.items():
            try:
                with variant():
                    r = measure()
            except Exception as err:  # noqa: BLE001
                res[name] = {"failed": repr(err)[:200]}
            else:
                if r["time_s"] < res.get(name, {}).get("time_s", float("inf")):
                    res[name] = r
            print(name, json.dumps(res[name]), flush=True)
            if json_path:
                Path(json_path).write_text(json.dumps(res, indent=1))
    return res


def w_engine(model, eos: int, **engine_kw):
    """The embedded engine as W's benches build it: bf16, `eos` its stop id, and all of W's rows (prompts x --group)
    in one batch (the engine's default of 64 rows would cut --group > 8 into batches of 64)."""
    import torch

    from rollout.engine import EmbeddedEngine

    engine_kw.setdefault("max_batch_size", W["prompts"] * W["group"])
    return EmbeddedEngine.from_module(model, eos_token_ids=[eos], dtype=torch.bfloat16, **engine_kw)


def bench_engine(model, items, eos: int, steps: int, warmup: int, **engine_kw) -> dict:
    """Median time of one W rollout through the engine, and its completion tokens/s."""
    import torch

    from rollout.api import SamplingParams

    free = torch.cuda.mem_get_info()[0]
    engine = w_engine(model, eos, **engine_kw)
    prompts = [it["prompt_ids"] for it in items]
    counter = iter(range(10**6))
    out = {}

    def once():
        params = SamplingParams(n=W["group"], temperature=1.0, max_new_tokens=W["new_tokens"], seed=next(counter))
        out["tokens"] = sum(len(c.token_ids) for c in engine.generate(prompts, params))

    t0 = time.perf_counter()
    once()  # first call: runner allocation, kernel compilation, graph capture
    first = time.perf_counter() - t0
    mem = (free - torch.cuda.mem_get_info()[0]) / 2**30
    med, times = timed(once, steps, max(0, warmup - 1))
    sync, _ = timed(lambda: engine.update_weights(model.state_dict()), steps, 1)
    engine.close()
    return {"time_s": med, "times": times, "tok_s": out["tokens"] / med, "tokens": out["tokens"], "first_call_s": first,
            "sync_s": sync, "mem_gib": mem}  # fmt: skip


# bench key -> (Triton projections, programmatic dependent launch); "engine" is (True, True)
VARIANTS = {"engine_cublas": (False, False), "engine_triton": (True, False), "engine_cublas_pdl": (False, True)}


@contextlib.contextmanager
def engine_variant(triton_linear: bool, pdl: bool):
    """The engine with its projections through cuBLAS instead of `kernels.linear`, and/or its kernels launched
    without programmatic dependent launch (both off: the engine as it decoded before issue 14's kernel work)."""
    from rollout import kernels

    saved = kernels.LINEAR_MAX_ROWS, kernels._pdl
    if not triton_linear:
        kernels.LINEAR_MAX_ROWS = 0
    if not pdl:
        kernels._pdl = lambda index: False
    try:
        yield
    finally:
        kernels.LINEAR_MAX_ROWS, kernels._pdl = saved


def bench_vllm(path: str, items, steps: int, warmup: int) -> dict:
    """W through vLLM (rollout/vllm_backend.py, its defaults: torch.compile + CUDA graphs), same sampling settings."""
    import torch

    from rollout.api import SamplingParams
    from rollout.vllm_backend import VLLMEngine

    free, t0 = torch.cuda.mem_get_info()[0], time.perf_counter()
    engine = VLLMEngine(path, dtype="bfloat16", max_batch_size=W["prompts"] * W["group"], gpu_memory_utilization=0.3)
    start = time.perf_counter() - t0
    prompts, counter, out = [it["prompt_ids"] for it in items], iter(range(10**6)), {}

    def once():
        params = SamplingParams(n=W["group"], temperature=1.0, max_new_tokens=W["new_tokens"], seed=next(counter))
        out["tokens"] = sum(len(c.token_ids) for c in engine.generate(prompts, params))

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    mem = (free - torch.cuda.mem_get_info()[0]) / 2**30
    med, times = timed(once, steps, max(0, warmup - 1))
    engine.close()
    return {"time_s": med, "times": times, "tok_s": out["tokens"] / med, "tokens": out["tokens"], "first_call_s": first,
            "start_s": start, "mem_gib": mem}  # fmt: skip


def bench_hf_static(model, items, tok, steps: int, warmup: int) -> dict:
    import torch

    m16 = type(model).from_pretrained(model.name_or_path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([it["prompt_ids"] for it in items for _ in range(W["group"])], device="cuda")
    kw = dict(max_new_tokens=W["new_tokens"], min_new_tokens=W["new_tokens"], do_sample=True, temperature=1.0,
              top_p=1.0, top_k=0, cache_implementation="static", pad_token_id=tok.pad_token_id)  # fmt: skip
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        m16.generate(ids, attention_mask=mask, **kw)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        med, times = timed(lambda: m16.generate(ids, attention_mask=mask, **kw), steps, max(0, warmup - 1))
    torch.cuda.empty_cache()
    tokens = ids.shape[0] * W["new_tokens"]
    return {"time_s": med, "times": times, "tok_s": tokens / med, "tokens": tokens, "first_call_s": first}


def rldock_run(
    path: str, tok, micro_batch: int, compile_model: bool = True, compute_copy: bool = True
) -> SimpleNamespace:
    """The trainer's own pieces for one GRPO step (config, engine factory, optimizer, learner, weight sync,
    workflow)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.api import SamplingParams
    from trainer.config import Config
    from trainer.dist import Dist
    from trainer.learner import Learner
    from trainer.loop import compute_weights, make_optimizer
    from trainer.rollout_factory import make_engine
    from trainer.weight_sync import make_weight_sync
    from trainer.workflow import SingleTurnWorkflow

    cfg = Config()
    cfg.model.path, cfg.rollout.n, cfg.rollout.max_new_tokens = path, W["group"], W["new_tokens"]
    cfg.train.batch_size, cfg.train.micro_batch_size = W["prompts"], micro_batch
    d = Dist(device=torch.device(DEVICE))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).train()
    engine = make_engine(cfg, model, tok, d, path)
    cfg.train.compile, cfg.train.compute_copy = compile_model, compute_copy
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    weights = compute_weights(cfg, model, d, dtype)  # as trainer.loop.build: bf16 copy, compiled layers (defaults)
    optimizer, scheduler = make_optimizer(cfg, model)
    params = SamplingParams(n=W["group"], temperature=1.0, max_new_tokens=W["new_tokens"])
    learner = Learner.for_config(cfg, weights, optimizer, scheduler, d, dtype, tok.pad_token_id)
    return SimpleNamespace(
        cfg=cfg, model=model, engine=engine, learner=learner,
        sync=make_weight_sync(cfg, engine, d, weights), workflow=SingleTurnWorkflow(tok, params),
    )  # fmt: skip


class FullGCTimer:
    """Seconds spent in full (generation-2) garbage collections, through `gc.callbacks` while entered; `take()`
    returns them since the last take."""

    def __init__(self):
        self.start, self.total = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self.start = time.perf_counter()
            else:
                self.total += time.perf_counter() - self.start

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total

    def __enter__(self) -> FullGCTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def bench_rldock_step(path: str, tok, items, steps: int, warmup: int, micro_batch: int, staleness: int = 0) -> dict:
    """One rldock GRPO step as the trainer's loop drives it: the batch from its rollout source (workflow rollout:
    engine + GSM8K reward), learner update, weight push. `staleness` = rollout.max_staleness: 0 generates the batch
    on demand; 1 has the AsyncSource generate the next batch in its thread (on the engine's own CUDA stream) while
    the learner trains on this one, so the "rollout" phase is the wait for it (staleness of the samples reported)."""
    import torch

    from trainer.async_rollout import make_source
    from trainer.loop import settle_gc

    run = rldock_run(path, tok, micro_batch)
    source = make_source(run.engine, run.workflow, lambda: (items, list(range(len(items)))), staleness)
    # rollout, update, sync s; CUDA graphs captured so far; s in full garbage collections
    phases: list[tuple[float, float, float, int, float]] = []
    version = run.engine.weight_version
    # the trainer thread's stream only, never the whole device: the producer thread may be capturing a CUDA graph,
    # and a device-wide synchronize during a capture is an error
    wait = torch.cuda.current_stream().synchronize

    def step(full_gc: FullGCTimer) -> float:
        nonlocal version
        t0 = time.perf_counter()
        trajs = [t for t in source.next_batch(version) if t is not None]
        wait()
        t1 = time.perf_counter()
        run.learner.update(trajs)
        wait()
        t2 = time.perf_counter()
        version = run.sync.push(run.model, version + 1)
        wait()
        t3 = time.perf_counter()
        phases.append((t1 - t0, t2 - t1, t3 - t2, run.engine.captures, full_gc.take()))
        return t3 - t0

    with FullGCTimer() as full_gc:
        for _ in range(warmup):
            step(full_gc)
        settle_gc()  # as trainer.loop.train after its first step
        full_gc.take()
        times = [step(full_gc) for _ in range(steps)]
    out = {"time_s": statistics.median(times), "times": times, "phases": phases,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
    for i, name in enumerate(("rollout_s", "update_s", "sync_s")):
        out[name] = statistics.median(p[i] for p in phases[-steps:])
    out.update(source.stats)
    source.close()
    run.engine.close()
    torch.cuda.empty_cache()
    return out


def bench_trl_step(path: str, items, steps: int, warmup: int) -> dict:
    """TRL GRPOTrainer on the same folder, prompts (as text), reward and batch: 8 prompts x 8 generations x 256."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from env_servers.gsm8k import score

    answers = {it["text"]: it["answer"] for it in items}

    def reward(prompts, completions, **_):
        return [score(c, answers.get(p, "0"))["reward"] for p, c in zip(prompts, completions, strict=True)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir="/tmp/rldock_w/trl", per_device_train_batch_size=W["prompts"] * W["group"],
        num_generations=W["group"], max_completion_length=W["new_tokens"], bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", beta=0.0,
        learning_rate=1e-6, max_steps=warmup + steps, logging_steps=1, save_strategy="no", report_to=[],
        generation_kwargs={"min_new_tokens": W["new_tokens"]}, seed=0,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": [it["text"] for it in items] * (warmup + steps)})
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=data, callbacks=[Clock()])
    trainer.train()
    med = statistics.median(times[warmup:])
    del trainer
    torch.cuda.empty_cache()
    import trl

    return {"time_s": med, "times": times, "version": trl.__version__}


def table(res: dict) -> str:
    n_tok = W["prompts"] * W["group"] * (W["prompt_tokens"] + W["new_tokens"])
    flops = 6 * res["params"] * n_tok
    completions = W["prompts"] * W["group"] * W["new_tokens"]
    rows = [f"GPU: {res['gpu']}  torch {res['torch']}  workload W ({res['params'] / 1e6:.1f} M params)"]
    rows.append(f"{'what':58s} {'time s':>8s} {'tok/s':>9s}  note")
    hf = res.get("hf_static")
    for key, label in (("engine", "rldock engine (fused kernels + CUDA graphs)"),
                       ("engine_cublas", "rldock engine, cuBLAS projections, no PDL"),
                       ("engine_triton", "rldock engine, Triton projections, no PDL"),
                       ("engine_cublas_pdl", "rldock engine, cuBLAS projections, PDL"),
                       ("engine_nograph", "rldock engine, fused kernels, no graphs"),
                       ("engine_unfused", "rldock engine, torch ops + CUDA graphs"),
                       ("hf_static", "HF generate, static cache"),
                       ("vllm", "vLLM (torch.compile + CUDA graphs)")):  # fmt: skip
        r = res.get(key)
        if r:
            note = f"x{r['tok_s'] / hf['tok_s']:.2f} vs HF static" if hf and key != "hf_static" else ""
            note += f"  first call {r['first_call_s']:.1f} s"
            note += f", start {r['start_s']:.1f} s" if "start_s" in r else ""
            note += f"; GPU memory {r['mem_gib']:.1f} GiB" if "mem_gib" in r else ""
            rows.append(f"rollout: {label:49s} {r['time_s']:8.3f} {r['tok_s']:9.0f}  {note}")
    if "engine" in res:
        rows.append(f"weight sync fp32 master -> engine bf16 copy{'':15s} {res['engine']['sync_s']:8.4f}")
    rd, trl = res.get("rldock_step"), res.get("trl_step")
    if rd:
        tflops = flops / rd["update_s"] / 1e12
        rows.append(f"GRPO step: rldock{'':41s} {rd['time_s']:8.3f} {completions / rd['time_s']:9.0f}  "
                    f"rollout {rd['rollout_s']:.3f} + learner {rd['update_s']:.3f} ({tflops:.0f} TFLOP/s) "
                    f"+ sync {rd['sync_s']:.3f}; peak {rd['peak_gib']:.1f} GiB")  # fmt: skip
    ra = res.get("rldock_async_step")
    if ra:
        rows.append(f"GRPO step: rldock, async (max_staleness 1){'':16s} {ra['time_s']:8.3f} "
                    f"{completions / ra['time_s']:9.0f}  wait for the batch {ra['rollout_s']:.3f} + learner "
                    f"{ra['update_s']:.3f} + sync {ra['sync_s']:.3f}; staleness <= {ra['staleness_max']}; "
                    f"peak {ra['peak_gib']:.1f} GiB")  # fmt: skip
    if trl:
        rows.append(f"GRPO step: TRL {trl['version']} GRPOTrainer (HF generate){'':14s} {trl['time_s']:8.3f} "
                    f"{completions / trl['time_s']:9.0f}")  # fmt: skip
    if trl:  # the goal is stated against either step; both are printed so neither is read for the other
        ratios = [f"x{trl['time_s'] / r['time_s']:.1f} {name}" for name, r in (("synchronous", rd), ("async", ra)) if r]
        if ratios:
            rows.append("ratio TRL / rldock step time: " + ", ".join(ratios))
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    path, tok, params = make_model_folder(args)
    items = w_items(tok)
    res: dict = {"params": params, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    eos = tok.eos_token_id
    res["engine"] = bench_engine(model, items, eos, args.steps, args.warmup)
    print("engine", json.dumps(res["engine"]), flush=True)
    for key, variant in VARIANTS.items():
        with engine_variant(*variant):
            res[key] = bench_engine(model, items, eos, args.steps, args.warmup)
    res["engine_nograph"] = bench_engine(model, items, eos, args.steps, 0, cuda_graphs=False)
    res["engine_unfused"] = bench_engine(model, items, eos, args.steps, args.warmup, fused=False)
    if not args.skip_hf:
        res["hf_static"] = bench_hf_static(model, items, tok, args.steps, args.warmup + 1)
    del model
    torch.cuda.empty_cache()
    if args.vllm:
        res["vllm"] = bench_vllm(path, items, args.steps, args.warmup)
        print("vllm", json.dumps(res["vllm"]), flush=True)
    res["rldock_step"] = bench_rldock_step(path, tok, items, args.steps, args.warmup + 1, args.micro_batch)
    print("rldock_step", json.dumps(res["rldock_step"]), flush=True)
    res["rldock_async_step"] = bench_rldock_step(path, tok, items, args.steps, args.warmup + 1, args.micro_batch, 1)
    print("rldock_async_step", json.dumps(res["rldock_async_step"]), flush=True)
    if not args.skip_trl:
        try:
            res["trl_step"] = bench_trl_step(path, items, args.steps, args.warmup + 1)
        except ImportError as err:
            print(f"TRL skipped: {err}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
