"""`python -m trainer.launch CONFIG [key=value ...]`: how the train container (and a Slurm step) starts training.

The layout comes from the environment, as torchrun's own variables do:
  NPROC        ranks on this node (one per GPU)                                  [1]
  NNODES       nodes in the job                                                  [1]
  NODE_RANK    this node's index, 0 .. NNODES-1 (node 0 hosts the rendezvous)   [0]
  MASTER_ADDR  node 0's address as the other nodes reach it                      [127.0.0.1]
  MASTER_PORT  the rendezvous port on node 0                                     [29500]
  RDZV_ID      a job id shared by all nodes of one run                           [rldock]
One node with one rank runs the trainer as a plain process (no FSDP: the fastest single-GPU path). Otherwise it
execs torchrun: `--standalone` on one node, c10d rendezvous at MASTER_ADDR:MASTER_PORT across several. Every node must
see the same saves/ folder (a shared filesystem): each rank writes its own checkpoint shard there.
"""

from __future__ import annotations

import os
import sys

LAYOUT = {"NPROC": "1", "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
          "RDZV_ID": "rldock"}  # fmt: skip


def layout(env: dict[str, str]) -> dict[str, str]:
    """The variables above with their defaults; a malformed count is one line naming it."""
    out = {key: env.get(key) or default for key, default in LAYOUT.items()}
    for key in ("NPROC", "NNODES", "NODE_RANK", "MASTER_PORT"):
        if not out[key].isdigit():
            raise ValueError(f"{key}={out[key]!r} must be a whole number")
    if int(out["NPROC"]) < 1 or int(out["NNODES"]) < 1:
        raise ValueError("NPROC and NNODES must be at least 1")
    if int(out["NODE_RANK"]) >= int(out["NNODES"]):
        raise ValueError(f"NODE_RANK={out['NODE_RANK']} must be below NNODES={out['NNODES']}")
    return out


def command(args: list[str], env: dict[str, str]) -> list[str]:
    """The argv to exec: the trainer itself, or torchrun around it."""
    lay = layout(env)
    trainer = ["-m", "trainer", *args]
    if lay["NPROC"] == "1" and lay["NNODES"] == "1":
        return [sys.executable, *trainer]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", lay["NPROC"]]
    if lay["NNODES"] == "1":
        return [*run, "--standalone", *trainer]
    return [
        *run, "--nnodes", lay["NNODES"], "--node_rank", lay["NODE_RANK"], "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"{lay['MASTER_ADDR']}:{lay['MASTER_PORT']}", "--rdzv_id", lay["RDZV_ID"],
        # Node 0 hosts the rendezvous store whatever its address looks like from inside a container.
        "--rdzv_conf", f"is_host={'true' if lay['NODE_RANK'] == '0' else 'false'}", *trainer,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not args:
        print(
            "error: no config: python -m trainer.launch CONFIG [key=value ...] (--help for the layout)", file=sys.stderr
        )
        return 2
    try:
        argv_out = command(args, dict(os.environ))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("[rldock] " + " ".join(argv_out[1:]), flush=True)
    os.execv(argv_out[0], argv_out)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
