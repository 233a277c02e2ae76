"""Merge a training checkpoint into a Hugging Face folder, optionally verify it and upload it to the hub.

    python -m scripts.model_merger --local_dir saves/<exp>/global_step_N[/actor] [--save_dir DIR]
        [--dtype bfloat16] [--max_shard_size 5GB] [--verify] [--overwrite] [--hf_upload_path user/name [--private]]

The checkpoint's `actor/model/` is a torch.distributed.checkpoint (DCP) folder written by any number of ranks (one
`.distcp` file per rank + `.metadata`). It is read without a process group, tensor by tensor, so a 1-rank checkpoint
merges exactly like an 8-rank one and memory stays near one output shard. Names are checked against the architecture
in `actor/config.json` (built on the meta device, no weights allocated) before anything is written; tied embeddings are
stored once, as `save_pretrained` does. Output goes to `<SAVE_DIR>.tmp` and is renamed when complete.

`--verify` reloads the merged folder with transformers and compares its logits on a fixed chat prompt with those of
the checkpoint's weights cast to the same dtype: max |logit difference| must be <= VERIFY_ATOL[dtype].
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from rollout.loading import umask_modes

DTYPES = ("bfloat16", "float16", "float32")
# Same weights and same kernels give identical logits; the margin only absorbs a different kernel choice. For half
# precision it is a fraction of one bf16 step at |logit| ~ 10 (0.0625).
VERIFY_ATOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
VERIFY_PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many?"
# Files of the actor folder that belong in the HF folder (config.json is rewritten, not copied).
METADATA_FILES = re.compile(
    r"(generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt"
    r"|chat_template\.(jinja|json)|.*\.tiktoken|preprocessor_config\.json)"
)
# Segments that torch.compile, activation checkpointing and FSDP1 wrappers insert into names (DDP: a `module.` prefix).
WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
READ_GROUP_BYTES = 256 * 2**20  # tensors fetched per DCP read: each read re-parses the checkpoint's .metadata


class MergeError(Exception):
    """A problem the user can fix; printed as one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.model_merger",
        description="Merge an rldock DCP checkpoint (any number of ranks) into a Hugging Face model folder.",
    )
    p.add_argument(
        "--local_dir",
        "--local-dir",
        dest="local_dir",
        required=True,
        help="saves/<exp>/global_step_N or .../actor (or saves/<exp>: latest)",
    )
    p.add_argument(
        "--save_dir", "--save-dir", dest="save_dir", help="output HF folder (default: <actor dir>/huggingface)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights")
    p.add_argument(
        "--max_shard_size",
        "--max-shard-size",
        dest="max_shard_size",
        default="5GB",
        help="largest safetensors file, e.g. 500MB, 5GB",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty SAVE_DIR")
    p.add_argument("--verify", action="store_true", help="reload the merged folder and compare logits")
    p.add_argument(
        "--hf_upload_path",
        "--hf-upload-path",
        dest="hf_upload_path",
        help="upload to this hub repo (user/name); token from HF_TOKEN",
    )
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    return p.parse_args(argv)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise MergeError(f"--max_shard_size {text!r}: expected a size like 500MB or 5GB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def resolve_actor_dir(local_dir: str) -> Path:
    """Accept the actor folder, the step folder, or the experiment folder (follows its `latest` file)."""
    path = Path(local_dir).expanduser()
    if not path.is_dir():
        raise MergeError(f"--local_dir {path}: no such directory")
    if (path / "latest").is_file() and not (path / "actor").exists():
        path = path / (path / "latest").read_text().strip()
    for candidate in (path, path / "actor"):
        if (candidate / "model").is_dir():
            return candidate
    raise MergeError(f"--local_dir {path}: no model/ checkpoint folder in it or in {path / 'actor'}")


def check_manifest(actor_dir: Path) -> None:
    """Refuse a checkpoint whose files differ from its manifest (trainer/manifest.py; older checkpoints have none)."""
    from trainer import manifest

    step_dir = actor_dir.parent if actor_dir.name == "actor" else actor_dir
    if (step_dir / manifest.MANIFEST).is_file():
        try:
            manifest.check(step_dir)
        except manifest.DamagedCheckpoint as err:
            raise MergeError(f"{step_dir} is damaged: {err}; merge an earlier global_step_N instead") from None


def normalise_name(name: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name.removeprefix("module.")


class Checkpoint:
    """A DCP folder opened without a process group: every shard file checked present and long enough up front."""

    def __init__(self, model_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not (model_dir / ".metadata").is_file():
            raise MergeError(f"{model_dir}: no .metadata file, not a complete DCP checkpoint")
        self.dir = model_dir
        self.reader = FileSystemReader(str(model_dir))
        try:
            metadata = self.reader.read_metadata()
        except Exception as e:
            raise MergeError(
                f"{model_dir}/.metadata is unreadable ({type(e).__name__}): the checkpoint is corrupt"
            ) from e
        self.storage = metadata.storage_data
        self._check_files()
        # normalised name -> (key in the checkpoint, its TensorStorageMetadata: global size, dtype)
        self.tensors = {
            normalise_name(key): (key, md)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def _check_files(self) -> None:
        needed: dict[str, int] = {}
        for info in self.storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        if not needed:
            raise MergeError(f"{self.dir}: the checkpoint holds no tensor shards")
        for rel, size in sorted(needed.items()):
            shard = self.dir / rel
            if not shard.is_file():
                raise MergeError(f"shard {shard} is missing")
            if shard.stat().st_size < size:
                raise MergeError(f"shard {shard} is truncated: {shard.stat().st_size} bytes, the index needs {size}")

    def load(self, entries: dict[str, tuple]) -> dict:
        """Read full tensors (every rank's chunks) for {name: (key, md)}; one DCP read per call."""
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        out = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype) for key, md in entries.values()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
                dcp.load(out, storage_reader=self.reader, no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
            cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
            keys = {key for key, _ in entries.values()}
            files = sorted({info.relative_path for idx, info in self.storage.items() if idx.fqn in keys})
            raise MergeError(
                f"cannot read {self.dir}/{','.join(files)}: the shard is corrupt ({type(cause).__name__})"
            ) from e
        return {name: out[key] for name, (key, _) in entries.items()}


def build_meta_model(actor_dir: Path):
    """The architecture named in config.json, on the meta device (shapes and names only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (actor_dir / "config.json").is_file():
        raise MergeError(f"{actor_dir}/config.json is missing: the checkpoint has no HF config to rebuild the model")
    config = AutoConfig.from_pretrained(actor_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def tied_names(model) -> tuple[str, str] | None:
    """(output, input) embedding parameter names when the two share storage, else None."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    modules = {id(m): name for name, m in model.named_modules()}
    return f"{modules[id(out)]}.weight", f"{modules[id(inp)]}.weight"


def plan_tensors(model, tensors: dict) -> dict[str, tuple]:
    """{output name: (checkpoint key, md)} in the model's order; raise on missing, unexpected or misshapen tensors."""
    expected = model.state_dict()
    tensors = dict(tensors)
    tied = tied_names(model)
    if tied:
        output, inp = tied
        if inp not in tensors and output in tensors:
            tensors[inp] = tensors[output]  # only the output copy was saved
        expected.pop(output)
        tensors.pop(output, None)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        raise MergeError(
            f"checkpoint does not match {type(model).__name__} from config.json: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for name, param in expected.items():
        size = tuple(tensors[name][1].size)
        if size != tuple(param.shape):
            raise MergeError(f"{name}: checkpoint shape {size} != model shape {tuple(param.shape)} from config.json")
    return {name: tensors[name] for name in expected}


def group_by_size(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy split in order; a tensor larger than max_bytes gets a group of its own."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


def write_weights(ckpt: Checkpoint, plan: dict[str, tuple], dtype, max_bytes: int, out: Path) -> list[str]:
    """Write model*.safetensors (+ index when sharded), holding at most one output shard in memory."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    def out_dtype(md):
        return dtype if md.properties.dtype.is_floating_point else md.properties.dtype

    sizes = {name: md.size.numel() * out_dtype(md).itemsize for name, (_, md) in plan.items()}
    shards = group_by_size(sizes, max_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = files if len(files) > 1 else ["model.safetensors"]
    weight_map = {}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="merging") as bar:
        for names, filename in zip(shards, files, strict=True):
            block = {}
            for group in group_by_size({n: sizes[n] for n in names}, READ_GROUP_BYTES):
                for name, tensor in ckpt.load({n: plan[n] for n in group}).items():
                    block[name] = tensor.to(out_dtype(plan[name][1])).contiguous()
                    weight_map[name] = filename
                bar.update(sum(sizes[n] for n in group))
            save_file(block, out / filename, metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_metadata(actor_dir: Path, config, dtype_name: str, out: Path) -> None:
    """config.json (dtype set to the saved one), generation config, tokenizer files and chat template."""
    from transformers import GenerationConfig

    config.dtype = dtype_name
    config.save_pretrained(out)
    for src in sorted(actor_dir.iterdir()):
        if src.is_file() and METADATA_FILES.fullmatch(src.name):
            shutil.copy2(src, out / src.name)
    if not (out / "generation_config.json").exists():
        GenerationConfig.from_model_config(config).save_pretrained(out)


def prepare_save_dir(save_dir: Path, overwrite: bool) -> Path:
    """Refuse a non-empty SAVE_DIR unless --overwrite; return a fresh temp folder beside it."""
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())) and not overwrite:
        raise MergeError(f"--save_dir {save_dir} is not empty: pass --overwrite to replace it, or pick another folder")
    tmp = save_dir.with_name(save_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run of ours
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, save_dir: Path) -> None:
    """Replace SAVE_DIR by the finished temp folder (the old one is removed only once the new one is complete)."""
    umask_modes(tmp)
    if save_dir.is_dir():
        shutil.rmtree(save_dir)
    elif save_dir.exists():
        save_dir.unlink()
    os.replace(tmp, save_dir)


def merge(args: argparse.Namespace) -> Path:
    import torch

    actor_dir = resolve_actor_dir(args.local_dir)
    check_manifest(actor_dir)
    save_dir = Path(args.save_dir).expanduser() if args.save_dir else actor_dir / "huggingface"
    max_bytes = parse_size(args.max_shard_size)
    ckpt = Checkpoint(actor_dir / "model")
    model = build_meta_model(actor_dir)
    plan = plan_tensors(model, ckpt.tensors)
    tmp = prepare_save_dir(save_dir, args.overwrite)
    try:
        files = write_weights(ckpt, plan, getattr(torch, args.dtype), max_bytes, tmp)
        write_metadata(actor_dir, model.config, args.dtype, tmp)
        publish(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {len(plan)} tensors from {ckpt.dir} into {save_dir} ({len(files)} file(s), {args.dtype})")
    return save_dir


def checkpoint_state(actor_dir: Path, model, dtype) -> dict:
    """The checkpoint's tensors under `model`'s state-dict names (a tied output shares its input's), cast to dtype."""
    ckpt = Checkpoint(actor_dir / "model")
    plan = plan_tensors(model, ckpt.tensors)
    state = {}
    for group in group_by_size({n: md.size.numel() * 4 for n, (_, md) in plan.items()}, READ_GROUP_BYTES):
        state.update(
            {n: t.to(dtype) if t.is_floating_point() else t for n, t in ckpt.load({n: plan[n] for n in group}).items()}
        )
    tied = tied_names(model)
    if tied:
        state[tied[0]] = state[tied[1]]
    return state


def verify(actor_dir: Path, save_dir: Path, dtype_name: str) -> float:
    """Max |logit difference| on VERIFY_PROMPT between the merged folder as transformers loads it and the same
    architecture holding the checkpoint's weights cast to the same dtype; raise above VERIFY_ATOL."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    messages = [{"role": "user", "content": VERIFY_PROMPT}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    else:
        ids = tokenizer(VERIFY_PROMPT)["input_ids"]
    input_ids = torch.tensor([list(ids)])
    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=dtype).eval()
    with torch.no_grad():
        got = model(input_ids).logits.float()
        # Same module, weights replaced: anything from_pretrained dropped or mangled now shows up as a difference.
        model.load_state_dict(checkpoint_state(actor_dir, model, dtype), strict=True)
        want = model(input_ids).logits.float()
    diff = (got - want).abs().max().item()
    tol = VERIFY_ATOL[dtype_name]
    if not diff <= tol:
        raise MergeError(f"verify failed: merged logits differ from the checkpoint's by {diff:.3g} (> {tol:g})")
    print(f"verify ok: max |logit diff| {diff:.3g} <= {tol:g} over {input_ids.shape[1]} tokens ({dtype_name})")
    return diff


def upload(save_dir: Path, repo_id: str, private: bool) -> None:
    import huggingface_hub

    token = os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise MergeError(f"--hf_upload_path needs a hub token: set HF_TOKEN (merged files kept in {save_dir})")
    # HF_ENDPOINT read now rather than at huggingface_hub's import: a mirror or a private hub set by the caller counts
    api = huggingface_hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(save_dir), repo_id=repo_id, commit_message="Upload merged rldock checkpoint")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MergeError(f"upload to {repo_id} failed ({first}); merged files kept in {save_dir}") from e
    print(f"uploaded {save_dir} to {api.endpoint}/{repo_id}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        save_dir = merge(args)
        if args.verify:
            verify(resolve_actor_dir(args.local_dir), save_dir, args.dtype)
        if args.hf_upload_path:
            upload(save_dir, args.hf_upload_path, args.private)
    except MergeError as e:
        print(f"model_merger: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"model_merger: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
