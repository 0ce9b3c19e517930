"""Folders that are complete or absent: write into a temporary sibling, rename into place at the end.

Temporary siblings are named `.NAME.tmp-PID-XXXXXXXX` (and `.NAME.old-PID-XXXXXXXX` for a replaced folder
on its way out), so the next writer of NAME can tell the leftovers of a killed writer (its pid is gone) from those
of one still running, and removes them (`clean_dead_writers`). Pids are those of this machine: a folder written
from several machines at once (a network file system) needs a lock of its own.
"""

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder next to `target`; on normal exit it is renamed to `target`, on an exception
    it is deleted and `target` is left as it was.

    An existing non-empty `target` is an error unless `overwrite`, both on entry and at the final rename: a folder
    (or file) that appeared at `target` while this one was being written (another export or conversion to the same
    new destination) is never replaced without `overwrite`; FileExistsError is raised and the temporary folder
    deleted. An empty folder at `target` counts as absent (rename replaces it; nothing is lost). With `overwrite`
    the old folder is moved aside, the new one renamed in, and the old one deleted (a crash in between leaves the
    old folder under a `.old-` name, which the next writer of `target` puts back when `target` is missing).
    """
    target = Path(target).resolve()
    clean_dead_writers(target)
    if _occupied(target) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets ordinary permissions
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
    old = None
    if overwrite and _occupied(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.rename(tmp, target)
    except OSError as err:
        if old is not None:
            os.replace(old / target.name, target)  # put the old folder back where it was
            old.rmdir()
        raise FileExistsError(
            f"{target} appeared while it was being written (another export or conversion to the same folder?); it "
            f"was left as it is ({type(err).__name__}: {err.strerror}); pass overwrite=True (--overwrite) to replace it"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_dead_writers(target: str | os.PathLike) -> list[Path]:
    """Removes the temporary siblings of `target` (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) whose writer process is
    gone; a `.old-` folder (the complete previous `target` of a writer killed while replacing it) is renamed back
    to `target` when `target` is missing. Returns the paths removed or restored."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    handled = []
    if not target.parent.is_dir():
        return handled
    for path in sorted(target.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or not path.is_dir() or _alive(int(match.group(2))):
            continue
        previous = path / target.name
        if match.group(1) == "old" and previous.is_dir() and not os.path.lexists(target):
            os.rename(previous, target)
        shutil.rmtree(path, ignore_errors=True)
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
