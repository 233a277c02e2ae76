"""A checkpoint's manifest: every file's size and sha256, written last, so a checkpoint is complete exactly when its
manifest is there, and damaged when a file it lists is missing, shorter, longer or different. No torch: the merger and
other readers check a checkpoint with it before they load one.

Hashing is split over ranks (`hash_files(..., part, parts)`): each rank reads a strided share of the files, rank 0
writes the union.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 8 * 2**20


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest; the message names the first bad file."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def listed_files(folder: Path) -> list[str]:
    """Every regular file under `folder` except the manifest, as sorted relative paths."""
    names = (p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(n for n in names if n != MANIFEST)


def hash_files(folder: Path, names: list[str], part: int = 0, parts: int = 1) -> dict[str, dict]:
    """{name: {"size", "sha256"}} for this rank's share of `names` (every `parts`-th, from `part`)."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": file_digest(folder / n)} for n in names[part::parts]}


def write(folder: Path, entries: dict[str, dict]) -> None:
    """The manifest, atomically (tmp + rename): until it exists the checkpoint is not complete."""
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": dict(sorted(entries.items()))}, indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, Path(folder) / MANIFEST)


def read(folder: Path) -> dict[str, dict]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(f"{path}: unreadable manifest ({type(err).__name__})") from None


def check(folder: Path, part: int = 0, parts: int = 1, sizes_only: bool = False) -> None:
    """Raise DamagedCheckpoint naming the first file (of this rank's share) that differs from the manifest."""
    files = read(folder)
    for name in sorted(files)[part::parts]:
        path, want = Path(folder) / name, files[name]
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise DamagedCheckpoint(f"{path} has {size} bytes, the manifest says {want['size']}")
        if not sizes_only and file_digest(path) != want["sha256"]:
            raise DamagedCheckpoint(f"{path} does not match its sha256 in the manifest")
