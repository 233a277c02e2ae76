"""How long a decode projection's programs take to get the activation x into shared memory, and what TMA multicast
across a thread-block cluster would save: the question the projections' tuning could not settle from Triton (3.6
cannot multicast). Builds bench/x_multicast.cu with nvcc (sm_90a) and runs it: for each CTA count, µs per launch in a
CUDA graph of stream-ordered launches, for an empty launch, every CTA copying all of x (W's 64 rows x 896 bf16,
112 KiB, L2-resident, in 16 KiB bulk copies as the projections' TMA tiles), and clusters of 2 and 4 whose CTAs each
copy 1/C of x, either into themselves only or multicast into the whole cluster (and, to tell the multicast's copy
from its two cluster barriers, the barriers alone).

    python bench/x_multicast.py [--ctas 36,132] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step as G  # noqa: E402  (the benches' shared option parsing)

SOURCE = Path(__file__).with_suffix(".cu")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctas", default="36,132", help="comma-separated CTA counts (qkv/o launch 36/28; one per SM: 132)")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    args.ctas = G.int_list(p, "--ctas", args.ctas)
    if any(c < 4 or c > 4096 or c % 4 for c in args.ctas):
        p.error("--ctas: each count must be a multiple of 4 (clusters of 2 and 4) from 4 to 4096")
    return args


def build(workdir: Path) -> Path:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        sys.exit("x_multicast: needs nvcc (a CUDA toolkit)")
    exe = workdir / "x_multicast"
    cmd = [nvcc, "-gencode", "arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-o", str(exe), str(SOURCE)]
    subprocess.run(cmd, check=True)
    return exe


def parse(stdout: str) -> list[dict]:
    """The program's rows ("ctas cluster mode us") as dicts, each with its excess over the empty launch, and over the
    launch with the cluster barriers alone (the multicast's set-up and tear-down) for the multicast rows."""
    rows = [line.split() for line in stdout.splitlines()[1:] if line.strip()]
    res = [{"ctas": int(c), "cluster": int(k), "mode": m, "us": float(u)} for c, k, m, u in rows]
    by_mode = {(r["ctas"], r["cluster"], r["mode"]): r["us"] for r in res}
    for r in res:
        r["over_empty_us"] = round(r["us"] - by_mode[(r["ctas"], r["cluster"], "empty")], 3)
        if r["mode"] == "multicast":
            r["over_syncs_us"] = round(r["us"] - by_mode[(r["ctas"], r["cluster"], "syncs_only")], 3)
    return res


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("x_multicast: needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        sys.exit("x_multicast: needs a Hopper GPU (sm_90a)")
    print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        out = subprocess.run([str(exe), *map(str, args.ctas)], check=True, capture_output=True, text=True).stdout
    res = parse(out)
    print(f"{'CTAs':>5} {'cluster':>7} {'copy':>11} {'µs/launch':>10} {'over empty':>11} {'over syncs':>11}")
    for r in res:
        syncs = f"{r['over_syncs_us']:11.3f}" if "over_syncs_us" in r else ""
        print(f"{r['ctas']:5d} {r['cluster']:7d} {r['mode']:>11} {r['us']:10.3f} {r['over_empty_us']:11.3f} {syncs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": res}, indent=1))


if __name__ == "__main__":
    main()
