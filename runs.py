"""Run folders that cannot mix results: a fingerprint of what produced them and a lock held by one process.

An evaluation run (`nativevl eval run --out`), a demo folder (`nativevl demo --out`) and a training `output_dir`
resume or add to what an earlier run left there. That is only safe when the earlier run had the same inputs, so
each records a fingerprint (data file digest, model weights digest, dtype, mode, limits) and refuses to continue
from a different one, naming what differs (`--overwrite` starts over instead). A second process writing into the
same folder at the same time would redo or interleave the work, so a run holds `RunLock` on its folder.

Digests are sha256. Files up to `FULL_HASH_BYTES` are hashed whole; larger ones (multi-GB weight shards) through
their size and `SAMPLED_BLOCKS` blocks of `BLOCK_BYTES` spread evenly over the file, first and last included: a
retrained or fine-tuned model changes every block, and hashing 15 GB of weights would take minutes.
"""

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path


FULL_HASH_BYTES = 256 * 2**20
BLOCK_BYTES = 2**20
SAMPLED_BLOCKS = 64
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LOCK_FILE = ".lock"


class RunFolderError(ValueError):
    """A run folder that may not be used: written by a run with other inputs, or in use by another process."""


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file ("sha256:<hex>"), sampled above `FULL_HASH_BYTES` ("sha256-sampled:<hex>")."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(BLOCK_BYTES), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        digest.update(str(size).encode())
        for k in range(SAMPLED_BLOCKS):
            f.seek((size - BLOCK_BYTES) * k // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))
    return f"sha256-sampled:{digest.hexdigest()}"


def weights_fingerprint(folder: str | os.PathLike) -> dict[str, str]:
    """{file name: `file_digest`} of the weight files (safetensors, bin, pt) directly in a model folder."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise RunFolderError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return {p.name: file_digest(p) for p in files}


def fingerprint_changes(old: Mapping, new: Mapping) -> list[str]:
    """'key: old -> new' for every key whose value differs (long values cut to 40 characters)."""

    def short(value) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = list(new) + [k for k in old if k not in new]
    return [f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def check_fingerprint(
    path: str | os.PathLike, fingerprint: Mapping, overwrite: bool = False, write: bool = True
) -> bool:
    """Records `fingerprint` in the JSON file `path` (unless `write` is False: the other ranks of a distributed
    run only check), or checks it against the one recorded there.

    Returns True when `path` held a different fingerprint and `overwrite` is set: the caller starts over (the new
    fingerprint is written). Raises RunFolderError naming what differs when `overwrite` is not set; a file that is
    not valid JSON (cut short) counts as a different fingerprint.
    """
    path = Path(path)
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as stored: tuples become lists
    changed = False
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            old = None
            detail = f"{path} is not valid JSON ({err})"
        else:
            detail = "; ".join(fingerprint_changes(old, fingerprint)) if isinstance(old, dict) else "not an object"
        if old != fingerprint:
            if not overwrite:
                raise RunFolderError(
                    f"{path.parent} holds a run with other settings or inputs ({detail}); pass --overwrite to start over or use "
                    "another folder"
                )
            changed = True
    if write:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
        os.replace(tmp, path)
    return changed


class RunLock:
    """Exclusive lock on a run folder (`folder/.lock`, holding the owner's pid), as a context manager.

    A second process entering it while the first holds it gets RunFolderError naming the owner's pid. The lock is
    an `fcntl.flock` on the file, released by the kernel when its owner exits for any reason, SIGKILL included: the
    lock file of a dead process is taken over without anyone deleting it. The same process may not nest it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is in use by process {owner} (lock {self.path}); wait for it to finish or use "
                "another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


__all__ = [
    "RunFolderError",
    "RunLock",
    "check_fingerprint",
    "file_digest",
    "fingerprint_changes",
    "weights_fingerprint",
]
