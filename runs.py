"""Run folders that cannot mix results, and files and folders that are complete or absent.

An evaluation run (`nativevl eval run --out`), a demo folder (`nativevl demo --out`) and a training `output_dir`
resume or add to what an earlier run left there. That is only safe when the earlier run had the same inputs, so
each records a fingerprint (data file digest, model weights digest, dtype, mode, limits) and refuses to continue
from a different one, naming what differs (`--overwrite` starts over instead). A second process writing into the
same folder at the same time would redo or interleave the work, so a run holds `RunLock` on its folder.

Digests are sha256. Files up to `FULL_HASH_BYTES` are hashed whole; larger ones (multi-GB weight shards) through
their size and `SAMPLED_BLOCKS` blocks of `BLOCK_BYTES` spread evenly over the file, first and last included: a
retrained or fine-tuned model changes every block, and hashing 15 GB of weights would take minutes.

Every file and folder nativevl writes goes through one writer: `atomic_write` (a file), `atomic_output_dir` (a
folder: exports, conversions, benchmarks, calibrated models) and `replace_folder` (a finished folder renamed over
an older one: checkpoints). Each writes into a hidden temporary sibling named `.NAME.tmp-PID-XXXXXXXX` and renames
it into place; a replaced folder goes aside as `.NAME.old-PID-XXXXXXXX` before it is deleted. The next writer into
the same parent removes what killed writers left (`clean_dead_writers`: their pid is gone) and puts back a
replaced folder whose successor never arrived. Pids are those of this machine: a folder written from several
machines at once (a network file system) needs a lock of its own.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    path: str | os.PathLike,
    fingerprint: Mapping,
    overwrite: bool = False,
    write: bool = True,
    stale: Iterable[str] = (),
) -> bool:
    """Records `fingerprint` in the JSON file `path` (unless `write` is False: the other ranks of a distributed
    run only check), or checks it against the one recorded there.

    Returns True when `path` held a different fingerprint and `overwrite` is set: the caller starts over (the new
    fingerprint is written, after the files named in `stale`, the earlier run's results next to `path`, are
    deleted). Raises RunFolderError naming what differs when `overwrite` is not set; a file that is not valid JSON
    (cut short) counts as a different fingerprint.
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
        if changed:  # the earlier run's results go before the new fingerprint claims the folder
            for name in stale:
                (path.parent / name).unlink(missing_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(fingerprint, indent=2) + "\n"))
    return changed


def read_predictions(path: str | os.PathLike) -> dict[str, dict]:
    """Rows of a JSONL results file (an eval run's `predictions.jsonl`) by their `id`. A last line cut short by a
    killed run is dropped from the file, so that the rerun appends after complete lines."""
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):  # a write interrupted mid-line: keep the complete lines only
        text = text[: text.rfind("\n") + 1]
        atomic_write(path, lambda tmp: tmp.write_text(text))
    predictions = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFolderError(f"{path} line {line_no} is not JSON ({err}); remove the line to resume") from None
        predictions[row["id"]] = row
    return predictions


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


# ----------------------------------------------------------------------------------------------------------------
# Complete or absent: the one writer of files and folders
# ----------------------------------------------------------------------------------------------------------------

# a temporary sibling `.NAME.tmp-PID-XXXXXXXX[.suffix]` or a replaced folder on its way out `.NAME.old-PID-XXXXXXXX`
# (XXXXXXXX: tempfile's 8 random characters)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]{8}(\.[^.]*)?$")


def _sibling(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _ordinary_permissions(path: Path, mode: int) -> None:
    """mkdtemp / mkstemp make a private file; the finished one gets what a plain open would give it."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file into a temporary sibling of `path` (same suffix, so writers that choose the
    format by it work), which is then renamed over `path`: a killed writer leaves the old file or the new one,
    never half of one. An exception deletes the temporary file and leaves `path` as it was."""
    path = Path(path)
    clean_dead_writers(path.parent)
    fd, name = tempfile.mkstemp(prefix=_sibling(path, "tmp"), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _ordinary_permissions(tmp, 0o666)
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder next to `target`; on normal exit it is renamed to `target`, on an exception
    it is deleted and `target` is left as it was.

    An existing non-empty `target` is an error unless `overwrite`, both on entry and at the final rename: a folder
    (or file) that appeared at `target` while this one was being written (another export or conversion to the same
    new destination) is never replaced without `overwrite`; FileExistsError is raised and the temporary folder
    deleted. An empty folder at `target` counts as absent (rename replaces it; nothing is lost). With `overwrite`
    the old folder is replaced through `replace_folder`.
    """
    target = Path(target).resolve()
    clean_dead_writers(target.parent)
    if _occupied(target) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling(target, "tmp"), dir=target.parent))
    _ordinary_permissions(tmp, 0o777)
    try:
        yield tmp
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _occupied(target: Path) -> bool:
    """Whether `target` holds something a rename would lose: a file, a link or a non-empty folder."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        return True
    return target.is_dir() and any(target.iterdir())


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Renames `tmp` to `target`. `os.rename` of a folder fails when the destination is a file or a non-empty
    folder, so a destination that appeared meanwhile is refused by the rename itself, with no window between a
    check and the rename."""
    try:
        if overwrite and _occupied(target):
            replace_folder(tmp, target)
        else:
            os.rename(tmp, target)
    except OSError as err:
        raise FileExistsError(
            f"{target} appeared while it was being written (another export or conversion to the same folder?); it "
            f"was left as it is ({type(err).__name__}: {err.strerror}); pass overwrite=True (--overwrite) to replace it"
        ) from None


def replace_folder(written: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames the finished folder `written` to `target`, replacing what is there. An existing `target` is first
    renamed aside into a hidden `.NAME.old-PID-*` sibling and deleted only once the new one is in place, under a
    `.tmp-` name: a kill at any point leaves `target` the complete old folder, the complete new one, or absent with
    the old one aside (the next writer into the parent puts it back), never a half-deleted folder under a name that
    looks valid (`transformers.trainer_utils.get_last_checkpoint` and checkpoint rotation ignore hidden names)."""
    written, target = Path(written), Path(target)
    clean_dead_writers(target.parent)
    old = None
    if os.path.lexists(target):
        old = Path(tempfile.mkdtemp(prefix=_sibling(target, "old"), dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.rename(written, target)
    except OSError:
        if old is not None:
            os.replace(old / target.name, target)  # put the old folder back where it was
            old.rmdir()
        raise
    if old is not None:
        name, _, rest = old.name.rpartition(".old-")
        trash = old.with_name(f"{name}.tmp-{rest}")  # from here on never put back
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_dead_writers(parent: str | os.PathLike) -> list[Path]:
    """Removes the temporary siblings (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`, files or folders) in `parent` whose
    writer process is gone, whatever their NAME; a `.old-` folder (the complete previous NAME of a writer killed
    while replacing it) is renamed back to NAME when NAME is missing. Returns the paths removed or restored."""
    parent = Path(parent)
    handled = []
    if not parent.is_dir():
        return handled
    for path in sorted(parent.iterdir()):
        match = _SIBLING.match(path.name)
        if match is None or _alive(int(match["pid"])):
            continue
        target = parent / match["name"]
        previous = path / match["name"]
        if path.is_dir() and not path.is_symlink():
            if match["kind"] == "old" and previous.is_dir() and not os.path.lexists(target):
                os.rename(previous, target)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        handled.append(path)
    return handled


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (ours or another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "RunFolderError",
    "RunLock",
    "atomic_output_dir",
    "atomic_write",
    "check_fingerprint",
    "clean_dead_writers",
    "file_digest",
    "fingerprint_changes",
    "read_predictions",
    "replace_folder",
    "weights_fingerprint",
]
