#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source, apply frankenllama's patch series, refresh it.

The llama.cpp tree frankenllama builds is the one vendored by the llama-cpp-python
source distribution whose ctypes bindings frankenllama reuses, so every struct layout
matches.  It is fetched with pip by package name, checked by sha256, and only its
``vendor/llama.cpp/`` is extracted.  Nothing of it is ever committed.

Commands::

    llama_source.py prepare [--dest DIR]   fetch (cached), extract, apply patches/ (idempotent)
    llama_source.py prepare --unpatched --dest DIR
                                           the same tree without the patches (the stock library)
    llama_source.py check                  do the patches apply to a fresh pristine tree?
    llama_source.py dev [--dest DIR]       like prepare, but the tree becomes a git repository
                                           with one commit per patch, for patch development
    llama_source.py refresh [--dest DIR]   rewrite patches/ from the commits of a `dev` tree
    llama_source.py rebase --version V     try the series on llama-cpp-python V's llama.cpp and
                                           report the hunks that do not apply

Environment::

    FRANKENLLAMA_CACHE          where the archive is cached (default ~/.cache/frankenllama)
    FRANKENLLAMA_SDIST          path to an already downloaded archive (offline builds)
    FRANKENLLAMA_LLAMA_CPP_DIR  use this already extracted and patched tree as is
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

ROOT = Path(__file__).resolve().parent.parent
# defined once, in the package (which reports it at run time); read by path: the build runs first
LLAMA_CPP_COMMIT = runpy.run_path(str(ROOT / "python" / "frankenllama" / "_version.py"))["LLAMA_CPP_COMMIT"]
PATCH_DIR = ROOT / "patches"
DEFAULT_DEST = ROOT / "vendor" / "llama.cpp"
DEV_DEST = ROOT / "build" / "llama.cpp-dev"  # a git repository: kept out of vendor/ (and out of git)
STAMP_NAME = ".frankenllama-stamp.json"
PRISTINE_TAG = "pristine"


class SourceError(RuntimeError):
    """The pinned source could not be fetched, verified or patched."""


def cache_dir() -> Path:
    return Path(os.environ.get("FRANKENLLAMA_CACHE", Path.home() / ".cache" / "frankenllama"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path) -> Path:
    actual = sha256_of(path)
    if actual != SDIST_SHA256:
        raise SourceError(
            f"{path}: sha256 is {actual}, expected {SDIST_SHA256}. The archive is not the pinned "
            f"{PACKAGE} {VERSION} source distribution; delete it and build again."
        )
    return path


def fetch_sdist() -> Path:
    """Return the verified source archive, downloading it with pip once into the cache."""
    override = os.environ.get("FRANKENLLAMA_SDIST")
    if override:
        path = Path(override)
        if not path.is_file():
            raise SourceError(f"FRANKENLLAMA_SDIST={override} is not a file")
        return _verified(path)

    cached = cache_dir() / "sdist" / SDIST_NAME
    if cached.is_file():
        return _verified(cached)

    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        downloaded = _download(VERSION, Path(tmp))
        _verified(downloaded)
        os.replace(downloaded, cached)
    return cached


def _download(version: str, folder: Path) -> Path:
    """Download the llama-cpp-python ``version`` source archive into ``folder`` with pip."""
    # --no-build-isolation: pip only reads the archive's metadata, with the
    # scikit-build-core already present; an isolated env would compile cmake from source.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--no-binary", PACKAGE, "--dest", str(folder), f"{PACKAGE}=={version}"]
    print(f"-- frankenllama: downloading {PACKAGE}=={version} source with pip", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    downloaded = folder / f"llama_cpp_python-{version}.tar.gz"
    if proc.returncode != 0 or not downloaded.is_file():
        raise SourceError(
            f"could not download {PACKAGE}=={version} with pip (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}\n"
            "Offline? Point FRANKENLLAMA_SDIST at a copy of the archive, or "
            "FRANKENLLAMA_LLAMA_CPP_DIR at a prepared llama.cpp tree."
        )
    return downloaded


def series() -> list[Path]:
    """The patch files, in the order they apply."""
    return sorted(PATCH_DIR.glob("*.patch"))


def series_digest() -> str:
    digest = hashlib.sha256(SDIST_SHA256.encode())
    for patch in series():
        digest.update(patch.name.encode())
        digest.update(patch.read_bytes())
    return digest.hexdigest()


def extract(archive: Path, dest: Path, version: str = VERSION) -> None:
    """Extract only vendor/llama.cpp/ of the archive into dest (replacing what was there)."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    if dest.exists():
        for child in dest.iterdir():
            if child.name == "README" and dest == DEFAULT_DEST:
                continue  # frankenllama's tracked note (llama.cpp's own is README.md)
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            member.name = member.name[len(prefix):]
            # .git is a submodule link into llama-cpp-python's repository: useless here
            if member.name and member.name.split("/")[0] != ".git":
                members.append(member)
        tar.extractall(dest, members=members, filter="data")


def _git_env(tree: Path) -> dict[str, str]:
    """Keep git from treating a tree inside another checkout as part of that checkout."""
    return {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.resolve().parent)}


def _checked(cmd: list[str], tree: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=_git_env(tree))
    if proc.returncode != 0:
        raise SourceError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
    return proc


def apply_series(tree: Path) -> None:
    """Apply patches/*.patch in order; fail naming the patch that does not apply."""
    for patch in series():
        check = subprocess.run(["git", "apply", "--check", "-p1", str(patch)],
                               cwd=tree, capture_output=True, text=True, env=_git_env(tree))
        if check.returncode != 0:
            raise SourceError(
                f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}:\n"
                f"{check.stderr.strip()}\nRefresh it with scripts/llama_source.py dev/refresh."
            )
        _checked(["git", "apply", "-p1", "--whitespace=nowarn", str(patch)], tree)


def prepare(dest: Path, patched: bool = True) -> Path:
    """Make dest hold the pinned tree, with the current patch series applied unless ``patched`` is false."""
    prepared = os.environ.get("FRANKENLLAMA_LLAMA_CPP_DIR")
    if prepared and patched:
        tree = Path(prepared).resolve()
        if not (tree / "include" / "llama.h").is_file():
            raise SourceError(f"FRANKENLLAMA_LLAMA_CPP_DIR={prepared} holds no llama.cpp tree")
        if "llama_layer_order_version" not in (tree / "include" / "llama.h").read_text():
            raise SourceError(f"FRANKENLLAMA_LLAMA_CPP_DIR={prepared} is not patched; "
                              "run scripts/llama_source.py prepare --dest on it first")
        return tree

    stamp = dest / STAMP_NAME
    want = {"sdist_sha256": SDIST_SHA256, "series": series_digest() if patched else None}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dest

    extract(fetch_sdist(), dest)
    if patched:
        apply_series(dest)
    stamp.write_text(json.dumps(want))
    applied = f"{len(series())} patch(es)" if patched else "no patches"
    print(f"-- frankenllama: llama.cpp {LLAMA_CPP_COMMIT} + {applied} in {dest}", file=sys.stderr, flush=True)
    return dest


def dev(dest: Path) -> None:
    """Extract a pristine tree, make it a git repository, and commit each patch on top."""
    extract(fetch_sdist(), dest)
    env = {"GIT_AUTHOR_NAME": "frankenllama", "GIT_AUTHOR_EMAIL": "dev@frankenllama",
           "GIT_COMMITTER_NAME": "frankenllama", "GIT_COMMITTER_EMAIL": "dev@frankenllama"}
    os.environ.update(env)
    _checked(["git", "init", "-q"], dest)
    _checked(["git", "add", "-A", "-f", "."], dest)
    _checked(["git", "commit", "-q", "-m", f"llama.cpp {LLAMA_CPP_COMMIT} (pristine)"], dest)
    _checked(["git", "tag", "-f", PRISTINE_TAG], dest)
    for patch in series():
        _checked(["git", "am", "-q", "--keep-cr", str(patch.resolve())], dest)
    print(f"dev tree ready in {dest}: edit, commit (one commit per patch), then `refresh`")


def refresh(dest: Path) -> None:
    """Rewrite patches/ from the commits of a dev tree since the pristine tag."""
    if not (dest / ".git").exists():
        raise SourceError(f"{dest} is not a dev tree; create it with `llama_source.py dev`")
    with tempfile.TemporaryDirectory() as tmp:
        _checked(["git", "format-patch", "-q", "--no-stat", "--no-signature",
                  "--zero-commit", "-N", "-o", tmp, f"{PRISTINE_TAG}..HEAD"], dest)
        new = sorted(Path(tmp).glob("*.patch"))
        for old in series():
            old.unlink()
        for patch in new:
            shutil.copy(patch, PATCH_DIR / patch.name)
    print(f"wrote {len(new)} patch(es) to {PATCH_DIR}")


def rebase(version: str) -> int:
    """Try the series on another llama-cpp-python release's llama.cpp; report each patch's hunks.

    Each patch is applied with ``git apply --reject`` on top of the ones before it, so one failed
    hunk does not hide the rest; returns the number of rejected hunks (0: the series applies)."""
    rejected_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(version, Path(tmp))
        print(f"{archive.name}: sha256 {sha256_of(archive)}")
        tree = Path(tmp) / "llama.cpp"
        extract(archive, tree, version)
        for patch in series():
            proc = subprocess.run(["git", "apply", "--reject", "-p1", "--whitespace=nowarn", str(patch)],
                                  cwd=tree, capture_output=True, text=True, env=_git_env(tree))
            rejects = sorted(tree.rglob("*.rej"))
            hunks = {str(r.relative_to(tree))[:-4]: r.read_text().count("\n@@ ") + r.read_text().startswith("@@ ")
                     for r in rejects}
            n_rejected = sum(hunks.values())
            rejected_total += n_rejected
            status = "applies" if proc.returncode == 0 else f"{n_rejected} hunk(s) rejected"
            print(f"{patch.name}: {status}")
            for path, n in hunks.items():
                print(f"    {path}: {n} hunk(s) rejected")
            for r in rejects:
                r.unlink()
    return rejected_total


def check() -> None:
    """Apply the series to a fresh pristine tree in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp) / "llama.cpp")
    print(f"{len(series())} patch(es) apply cleanly to llama.cpp {LLAMA_CPP_COMMIT}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "check", "dev", "refresh", "fetch", "rebase"])
    parser.add_argument("--version", help="rebase: the llama-cpp-python release to try")
    parser.add_argument("--dest", type=Path, default=None,
                        help=f"tree to work on (default: {DEFAULT_DEST} for prepare, {DEV_DEST} for dev/refresh)")
    parser.add_argument("--unpatched", action="store_true",
                        help="prepare: leave the patches out (needs --dest: vendor/llama.cpp is the patched tree)")
    args = parser.parse_args(argv)
    if args.unpatched and (args.command != "prepare" or args.dest is None):
        parser.error("--unpatched goes with `prepare --dest DIR`")
    if args.dest is None:
        args.dest = DEV_DEST if args.command in ("dev", "refresh") else DEFAULT_DEST
    try:
        if args.command == "prepare":
            print(prepare(args.dest.resolve(), patched=not args.unpatched))
        elif args.command == "fetch":
            print(fetch_sdist())
        elif args.command == "check":
            check()
        elif args.command == "rebase":
            if not args.version:
                parser.error("rebase needs --version")
            return 1 if rebase(args.version) else 0
        elif args.command == "dev":
            dev(args.dest.resolve())
        else:
            refresh(args.dest.resolve())
    except SourceError as err:
        print(f"frankenllama: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
