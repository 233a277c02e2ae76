"""`make docker-bundle` / `make docker-load`: rldock's images (and optionally models/ and data/) in one archive, for
hosts that reach no registry.

    python -m scripts.bundle save rldock-latest.tar --tag latest --images train scripts eval [--with-data]
    python -m scripts.bundle load rldock-latest.tar [--overwrite]

The archive is a plain tar: `rldock-bundle.json` (what it holds), `images.tar` (`docker save` of the images, layers
shared between them stored once), and with --with-data the checkout's models/ and data/. `load` streams images.tar
into `docker load` and unpacks models/ and data/ into the checkout, keeping files that are already there unless
--overwrite. Standard library and the docker CLI only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from scripts.docker_cli import IMAGES, docker, error_line, image_ref, not_built

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "rldock-bundle.json"
IMAGES_MEMBER = "images.tar"
DATA_DIRS = ("models", "data")
CHUNK = 1 << 20


class BundleError(Exception):
    """A problem the user can fix; printed as one line."""


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def save(path: Path, tag: str, images: list[str], with_data: bool, root: Path = ROOT) -> dict:
    refs = [image_ref(name, tag) for name in images]
    missing = not_built(refs)
    if missing:
        raise BundleError(f"not built: {', '.join(missing)} (make docker-build TAG={tag})")
    tmp = path.with_name(path.name + ".images.tmp")
    manifest = {"tag": tag, "images": refs, "data": list(DATA_DIRS) if with_data else [], "created": time.time()}
    try:
        print(f"bundle: docker save {' '.join(refs)}", flush=True)
        out = docker("save", "-o", str(tmp), *refs, timeout=None)
        if out.returncode != 0:
            raise BundleError(f"docker save failed: {error_line(out.stderr)}")
        print(f"bundle: images {_mb(tmp.stat().st_size)}; writing {path}", flush=True)
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(MANIFEST)
            blob = json.dumps(manifest, indent=2).encode()
            info.size, info.mtime = len(blob), int(time.time())
            tar.addfile(info, io.BytesIO(blob))
            tar.add(tmp, arcname=IMAGES_MEMBER)
            for name in manifest["data"]:
                if (root / name).is_dir():
                    print(f"bundle: adding {name}/", flush=True)
                    tar.add(root / name, arcname=name, filter=_no_links_out)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    print(f"bundle: {path} ({_mb(path.stat().st_size)})")
    return manifest


def _no_links_out(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Symlinks would point at this host's paths: leave them out (HF caches hold some)."""
    return None if info.issym() or info.islnk() else info


def _safe_member(member: tarfile.TarInfo, allowed: list[str]) -> bool:
    parts = Path(member.name).parts
    return bool(parts) and parts[0] in allowed and ".." not in parts and not Path(member.name).is_absolute()


def load(path: Path, overwrite: bool = False, root: Path = ROOT) -> dict:
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle (make docker-bundle writes one)")
    try:
        tar = tarfile.open(path, "r")
    except tarfile.TarError as err:
        raise BundleError(f"{path} is not a bundle: {err}") from None
    with tar:
        try:
            manifest = json.load(tar.extractfile(MANIFEST))
        except (KeyError, json.JSONDecodeError):
            raise BundleError(f"{path} has no valid {MANIFEST}: not made by make docker-bundle") from None
        _load_images(tar, manifest["images"])
        kept = _unpack_data(tar, manifest.get("data", []), overwrite, root)
    print(f"bundle: loaded {' '.join(manifest['images'])}" + (f"; kept {kept} existing file(s)" if kept else ""))
    return manifest


def _load_images(tar: tarfile.TarFile, refs: list[str]) -> None:
    print(f"bundle: docker load ({_mb(tar.getmember(IMAGES_MEMBER).size)})", flush=True)
    proc = subprocess.Popen(["docker", "load", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
    try:
        shutil.copyfileobj(tar.extractfile(IMAGES_MEMBER), proc.stdin, CHUNK)
    finally:
        proc.stdin.close()
    out = proc.stdout.read().decode(errors="replace")
    if proc.wait() != 0:
        raise BundleError(f"docker load failed: {error_line(out)}")
    missing = not_built(refs)
    if missing:
        raise BundleError(f"docker load did not restore {', '.join(missing)}")


def _unpack_data(tar: tarfile.TarFile, dirs: list[str], overwrite: bool, root: Path) -> int:
    kept = 0
    for member in tar.getmembers():
        if not _safe_member(member, dirs) or not (member.isfile() or member.isdir()):
            continue
        target = root / member.name
        if member.isfile() and target.exists() and not overwrite:
            kept += 1
            continue
        tar.extract(member, root, filter="data")
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bundle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_save = sub.add_parser("save", help="write images (and models/ data/) to BUNDLE")
    p_save.add_argument("bundle", type=Path)
    p_save.add_argument("--tag", default="latest", help="image tag (TAG)")
    p_save.add_argument("--images", nargs="+", default=["train", "scripts", "eval"], choices=IMAGES)
    p_save.add_argument("--with-data", action="store_true", help="also models/ and data/ of the checkout")
    p_load = sub.add_parser("load", help="load BUNDLE's images, unpack its models/ data/ into the checkout")
    p_load.add_argument("bundle", type=Path)
    p_load.add_argument("--overwrite", action="store_true", help="replace files already in models/ data/")
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            save(args.bundle, args.tag, args.images, args.with_data)
        else:
            load(args.bundle, args.overwrite)
    except BundleError as err:
        print(f"bundle: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:  # no docker CLI (or a path that vanished mid-way)
        print(f"bundle: {err.filename or err}: not found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
