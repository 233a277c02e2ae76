"""Past one GPU: data-parallel scaling, disaggregated async overlap, and a model that needs a second GPU (or the
host's memory). Every part runs the real trainer (`python -m trainer`, under torchrun where it shards) and reads the
step times and memory from its metrics.jsonl; nothing is timed here that the trainer does not log itself.

Parts (--part; one device call each, the machine's GPUs as the part needs them):
  dp     Workload W's model (bench/grpo_step.py: Qwen2.5-0.5B shape, random init, vocab 49,152) with W's batch per
         GPU (8 GSM8K prompts x 8 samples x 256 new tokens, micro-batch 64), each rank generating with its own
         colocated engine; 1 GPU, then 2 GPUs (FSDP2), in the same call: samples/s and the ratio.
  async  SmolLM2-135M-Instruct on GSM8K (configs/gsm8k_h100_15min.yaml's GRPO recipe, no SFT): trainer on GPU 0,
         rollout service on GPU 1 (rollout.backend=http, weight_sync=nccl), first with the staleness bound
         eta = 0, then eta = 1: step time against max(rollout, learner + sync) and their sum, the staleness of the
         trained samples, and both reward curves side by side (async_curves.png).
  big    A Qwen2.5-7B-shape model (random init, vocab 49,152: ~6.9 B parameters; fp32 master weights and AdamW take
         ~110 GB before gradients, activations and the engine's bf16 copy) with W's batch per GPU: 2 GPUs (FSDP2),
         1 GPU (expected not to fit), 1 GPU with train.cpu_offload=true. Per-GPU peak memory and step time.

    python bench/scaling.py --part dp --tokenizer .carry/tok --out $OUT
    python bench/scaling.py --part async --gguf-parts /tmp/part1 .carry/g2/part2 --out $OUT
    python bench/scaling.py --part big --tokenizer .carry/tok --out $OUT
Writes --out/scaling_<part>.json (and async_curves.png) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Multicast stays off in every process started here (the lent machines' rule: it can take the host's GPUs down).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
QWEN7B_SHAPE = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=49152, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)  # fmt: skip
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip  # CPU smoke test
QUIET = ["logging.wandb=false", "logging.progress=false", "eval.every=0", "checkpoint.every=0",
         "checkpoint.at_end=false", "checkpoint.resume=false"]  # fmt: skip
T0 = time.monotonic()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("dp", "async", "big"), required=True)
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct", help="a 49,152-token tokenizer folder")
    p.add_argument("--gguf-parts", nargs="+", help="halves of the built-in GGUF to join first (part async)")
    p.add_argument("--models-dir", default="/tmp/models", help="where the built-in model is converted (part async)")
    p.add_argument("--work", default="/tmp/rldock_scaling", help="model folders and experiments")
    p.add_argument("--out", default=os.environ.get("OUT", "scaling_out"), help="results go here")
    p.add_argument("--steps", type=int, default=0, help="steps per run (0 = the part's default)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (compile, warm-up)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="part dp: GPU counts to run")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the plumbing")
    p.add_argument("--shape", choices=("w", "qwen7b", "tiny"), help="model of parts dp/big (default: w / qwen7b)")
    p.add_argument("--only", nargs="+", help="part big: run only these (big_2gpu, big_1gpu, big_1gpu_offload)")
    p.add_argument("--timeout", type=float, default=480, help="seconds one trainer run may take")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra trainer overrides for every run")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[scaling {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def child_env(gpus: str | None) -> dict[str, str]:
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


# ------------------------------------------------------------------------------------------------- model folders


def make_model_folder(shape: str, tokenizer: str, path: Path, device: str) -> None:
    """A random-init Qwen2 folder of the given shape (bf16 on disk; the trainer loads fp32 master weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.grpo_step import QWEN05_SHAPE
    from rollout.loading import load_tokenizer

    tok = load_tokenizer(tokenizer)  # the trainer's: a pad token even where the folder has none
    dims = {"w": QWEN05_SHAPE, "qwen7b": QWEN7B_SHAPE, "tiny": TINY_SHAPE}[shape]
    cfg = AutoConfig.for_model("qwen2", **dims, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # a 7 B init on the host takes minutes; on the GPU seconds
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    log(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters written to {path}")


def model_folder(args, shape: str) -> Path:
    """Made in a child process, so this one never holds GPU memory while the trainers run."""
    path = Path(args.work) / f"model_{shape}"
    if not (path / "config.json").is_file():
        code = f"from bench.scaling import make_model_folder as m; m({shape!r}, {args.tokenizer!r}, {str(path)!r}, {args.device!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=child_env(None))
    return path


# ---------------------------------------------------------------------------------------------------- the trainer


def trainer_cmd(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    """torchrun for FSDP2 (any rank count, one included); a plain process for the unsharded run."""
    if nproc == 0:
        return [sys.executable, "-m", "trainer", str(config), *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, "-m", "trainer", str(config), *overrides]


def train(args, name: str, nproc: int, overrides: list[str], gpus: str | None, base: str | None = None) -> dict:
    """One trainer run; its per-step metrics, exit code and the tail of its output."""
    work = Path(args.work)
    config = work / f"{name}.yaml"
    config.write_text((ROOT / base).read_text() if base else "{}\n")
    exp = [f"experiment_name={name}", f"checkpoint.save_dir={work}/saves", f"train.device={args.device}"]
    cmd = trainer_cmd(nproc, config, [*QUIET, *exp, *overrides, *args.overrides])
    log(f"{name}: {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    log_path = Path(args.out) / f"{name}.log"  # in --out, so a run cut short by the device's limit still returns it
    with open(log_path, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=child_env(gpus), stdout=out, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    text = log_path.read_text(errors="replace")
    metrics = work / "saves" / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "time/step" in r]
    log(f"{name}: exit {rc} after {time.monotonic() - t0:.0f} s, {len(rows)} steps")
    return {"name": name, "rc": rc, "rows": rows, "tail": text[-3000:], "wall_s": time.monotonic() - t0}


def medians(run: dict, warmup: int) -> dict:
    """Medians over the steps after the warm-up, and what a run that failed says about why."""
    rows = run["rows"][warmup:]
    out: dict = {"name": run["name"], "rc": run["rc"], "steps": len(run["rows"])}
    if not rows:
        out["failure"] = failure_line(run["tail"])
        return out
    for key in ("time/step", "time/rollout", "time/update", "time/sync", "time/rollout_slowest", "trajectories",
                "response_length", "memory/peak_gib"):  # fmt: skip
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = statistics.median(values)
    out["memory/peak_gib"] = max((r.get("memory/peak_gib", 0.0) for r in run["rows"]), default=0.0)
    out["samples_per_s"] = out["trajectories"] / out["time/step"]
    return out


def failure_line(tail: str) -> str:
    """The line that says why a run stopped: an out-of-memory error (it names the GPU and the sizes), the trainer's
    one-line error, else the first exception line that is not the launcher's own."""
    lines = [x.strip() for x in tail.splitlines() if x.strip() and "ChildFailedError" not in x]
    for marker in ("out of memory", "error: ", "error"):
        hits = [x for x in lines if marker in x.lower()]
        if hits:
            return hits[0][:400]
    return lines[-1][:400] if lines else "no output"


# ---------------------------------------------------------------------------------------------------------- parts


def part_dp(args) -> dict:
    path = model_folder(args, args.shape or "w")
    steps = args.steps or 8
    res = {}
    for n in args.gpus:
        overrides = [f"model.path={path}", "rollout.n=8", "rollout.max_new_tokens=256", "rollout.max_batch_size=64",
                     f"train.batch_size={8 * n}", "train.micro_batch_size=64", f"train.total_steps={steps}",
                     "grpo.drop_zero_adv_groups=false"]  # fmt: skip
        # One GPU is a plain process (what `python -m trainer` gives, no FSDP); more are torchrun ranks.
        run = train(args, f"dp_{n}gpu", n if n > 1 else 0, overrides, ",".join(str(i) for i in range(n)))
        res[f"{n}gpu"] = medians(run, args.warmup)
        write_results(args, res)
    return res


def dp_table(res: dict) -> str:
    rows = ["GPUs  samples/s  step s  rollout s  slowest rank's rollout s  update s  sync s  peak GiB  scaling"]
    one = res.get("1gpu", {}).get("samples_per_s")
    for key, r in res.items():
        if "samples_per_s" not in r:
            rows.append(f"{key}: did not run: {r.get('failure')}")
            continue
        scale = f"x{r['samples_per_s'] / one:.2f}" if one else ""
        rows.append(f"{key:5s} {r['samples_per_s']:9.1f} {r['time/step']:7.3f} {r['time/rollout']:9.3f} "
                    f"{r['time/rollout_slowest']:25.3f} {r['time/update']:9.3f} {r['time/sync']:7.3f} "
                    f"{r['memory/peak_gib']:9.1f}  {scale}")  # fmt: skip
    return "\n".join(rows)


def start_service(args, model: str, port: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "rollout.server", "--model", model, "--port", str(port), "--device", args.device,
           "--max-batch-size", "512", "--log-level", "warning"]  # fmt: skip
    log("service: " + " ".join(cmd[1:]))
    out = open(Path(args.out) / f"service_{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env("1"), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"rollout service exited with {proc.returncode}; see {out.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("rollout service did not become healthy in 300 s")


def stop_service(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def part_async(args) -> dict:
    from rollout.loading import resolve_model_path

    if args.gguf_parts:
        from bench.learning_run import join_gguf

        join_gguf(args.gguf_parts)
    model = resolve_model_path("smollm2-135m-instruct", args.models_dir)  # converted once, before both processes
    steps = args.steps or 40
    res = {}
    for eta in (0, 1):
        port = 8300 + eta
        service = start_service(args, model, port)
        try:
            overrides = [f"model.path={model}", "sft.steps=0", "train.time_limit_s=0", f"train.total_steps={steps}",
                         "rollout.backend=http", f'rollout.urls=["http://127.0.0.1:{port}"]',
                         "weight_sync=nccl", f"rollout.max_staleness={eta}"]  # fmt: skip
            run = train(args, f"async_eta{eta}", 0, overrides, "0", base="configs/gsm8k_h100_15min.yaml")
        finally:
            stop_service(service)
        res[f"eta{eta}"] = {**medians(run, args.warmup), "curve": [[r["step"], r["reward"]] for r in run["rows"]],
                            "staleness": dict(Counter(r.get("staleness", 0) for r in run["rows"]))}  # fmt: skip
    plot_curves(res, Path(args.out) / "async_curves.png")
    return res


def async_table(res: dict) -> str:
    sync, overlap = res["eta0"], res["eta1"]
    if "time/step" not in sync or "time/step" not in overlap:
        return f"did not run: {sync.get('failure') or overlap.get('failure')}"
    learner = sync["time/update"] + sync["time/sync"]
    ideal, total = max(sync["time/rollout"], learner), sync["time/rollout"] + learner
    return "\n".join([
        f"eta=0: step {sync['time/step']:.3f} s = rollout {sync['time/rollout']:.3f} + update {sync['time/update']:.3f}"
        f" + sync {sync['time/sync']:.3f}; staleness {sync['staleness']}",
        f"eta=1: step {overlap['time/step']:.3f} s (waiting for rollout {overlap['time/rollout']:.3f}, update "
        f"{overlap['time/update']:.3f}, sync {overlap['time/sync']:.3f}); staleness {overlap['staleness']}",
        f"max(rollout, learner + sync) = {ideal:.3f} s, sum = {total:.3f} s; eta=1 step / max = "
        f"x{overlap['time/step'] / ideal:.2f}, eta=0 step / eta=1 step = x{sync['time/step'] / overlap['time/step']:.2f}",
    ])  # fmt: skip


def plot_curves(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (key, title) in zip(axes, (("eta0", "synchronous (eta = 0)"), ("eta1", "async (eta = 1)")), strict=True):
        curve = res[key].get("curve") or [[0, 0.0]]
        steps, rewards = zip(*curve, strict=True)
        ax.plot(steps, rewards, marker=".", label="reward")
        window = 5
        smooth = [statistics.mean(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))]
        ax.plot(steps, smooth, label=f"mean of last {window}")
        ax.set_title(f"SmolLM2-135M GSM8K, {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("train reward")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def part_big(args) -> dict:
    path = model_folder(args, args.shape or "qwen7b")
    steps = args.steps or 4
    common = [f"model.path={path}", "rollout.n=8", "rollout.max_new_tokens=256", "rollout.max_batch_size=64",
              "train.micro_batch_size=16", f"train.total_steps={steps}", "grpo.drop_zero_adv_groups=false"]  # fmt: skip
    runs = (("big_2gpu", 2, "0,1", ["train.batch_size=16"]),
            ("big_1gpu", 0, "0", ["train.batch_size=8"]),
            ("big_1gpu_offload", 1, "0", ["train.batch_size=8", "train.cpu_offload=true"]))  # fmt: skip
    res = {}
    for name, n, gpus, extra in runs:
        if args.only and name not in args.only:
            continue
        res[name] = medians(train(args, name, n, [*common, *extra], gpus), min(args.warmup, steps - 1))
        write_results(args, res)
    return res


def big_table(res: dict) -> str:
    rows = ["run               step s  rollout s  update s  sync s  samples/s  peak GiB per GPU"]
    for name, r in res.items():
        if "time/step" not in r:
            rows.append(f"{name:17s} did not run ({r['steps']} steps): {r.get('failure')}")
            continue
        rows.append(f"{name:17s} {r['time/step']:6.2f} {r['time/rollout']:9.2f} {r['time/update']:9.2f} "
                    f"{r['time/sync']:7.2f} {r['samples_per_s']:10.1f} {r['memory/peak_gib']:12.1f}")  # fmt: skip
    return "\n".join(rows)


def write_results(args, res: dict) -> dict:
    """--out/scaling_<part>.json, rewritten after every run (a call cut short keeps what finished)."""
    meta = {"part": args.part, "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torch

        meta.update(
            torch=torch.__version__, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        )
    except Exception as err:  # the table matters more than the versions line
        meta["versions_error"] = str(err)
    (Path(args.out) / f"scaling_{args.part}.json").write_text(json.dumps({**meta, "results": res}, indent=1))
    return meta


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    part, table = {"dp": (part_dp, dp_table), "async": (part_async, async_table), "big": (part_big, big_table)}[
        args.part
    ]
    res = part(args)
    print(json.dumps(write_results(args, res)))
    print(table(res))


if __name__ == "__main__":
    main()
