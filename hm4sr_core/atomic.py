"""Writing files and folders so that a failure or a kill never loses what was there.

The one place that writes atomically (data/store.py, train.py and the notebooks use it):

* :func:`write_via_temp` / :func:`write_bytes_atomic`: a file is written under a
  temporary name beside its target (``.<name>.tmp-XXXXXXXX``), then renamed into place;
* :func:`replace_folder`: a folder written under ``.<name>.tmp-*`` takes the place of
  its target in two renames (the old folder goes to ``.<name>.old-<pid>`` first);
* :func:`target_lock`: one writer per target at a time (``fcntl.flock`` on
  ``.<name>.lock`` beside the target); the second waits, or is refused with one line;
* :func:`recover_folder` / :func:`remove_temp_files`: what a killed writer left behind is
  restored or removed by the next writer of the same target, under its lock;
* :func:`follow_umask`: temporary files and folders are created 0600/0700 by
  ``tempfile``; what takes a target's place gets the modes the user's umask gives.

Fault injection: with ``HM4SR_FAULT=<point>`` or ``<point>:<target name>`` in the
environment the process kills itself (SIGKILL) at that point, so tests reproduce a kill at
the worst moment without luck. Points: ``between-renames`` (old folder moved aside, new
one not yet in place) and ``before-file-rename`` (a file's temporary copy complete, not
yet renamed), e.g. ``HM4SR_FAULT=before-file-rename:last.pt``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

FAULT_VARIABLE = "HM4SR_FAULT"
NAME_BYTES = 200  # a target's name; leaves room for ".<name>.tmp-XXXXXXXX" within the usual 255-byte limit


class Busy(OSError):
    """Another process holds the lock on a target (the message names it and the holder)."""


def fault_point(name: str, target: str = "") -> None:
    """Kill this process now when ``HM4SR_FAULT`` names this point, alone or as
    ``<point>:<target file name>`` (tests only)."""
    if os.environ.get(FAULT_VARIABLE) in (name, f"{name}:{target}"):
        os.kill(os.getpid(), signal.SIGKILL)


def current_umask() -> int:
    """This process's umask, read without changing it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file 0o666 and a folder 0o777, less the umask (what ``open``/``mkdir`` give)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def check_name(name: str, option: str) -> str:
    """``name`` as one folder or file name that leaves room for our temporary names;
    ValueError naming ``option`` otherwise."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{option} {name!r}: expected a folder name (no '/' or '\\', not '.' or '..')")
    size = len(os.fsencode(name))
    if size > NAME_BYTES:
        raise ValueError(f"{option}: a name of {size} bytes ({name[:24]}...); expected at most {NAME_BYTES} bytes "
                         f"(file systems allow 255, less room for temporary names)")
    return name


# --------------------------------------------------------------------------- files


def temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def write_via_temp(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it to ``path``.

    A failure removes the temporary file and leaves ``path`` as it was. The result
    follows the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        follow_umask(tmp)
        fault_point("before-file-rename", path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes through a temporary file in the same folder, then rename."""
    write_via_temp(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


# Temporary files: ours (".<name>.tmp-XXXXXXXX") and those of earlier versions (".<name>.XXXXXXXX").
_TEMP_FILE = re.compile(r"^\.(?P<name>.+?)\.(?:tmp-)?[A-Za-z0-9_]{8}$")


def temp_files(folder: Path, names: tuple[str, ...]) -> dict[str, list[Path]]:
    """Temporary files a killed writer left in ``folder`` for each of ``names``, newest first."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    for entry in folder.iterdir():
        match = _TEMP_FILE.match(entry.name)
        if match and match["name"] in names and entry.is_file():
            found.setdefault(match["name"], []).append(entry)
    for paths in found.values():
        paths.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return found


def remove_temp_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files of ``names`` in ``folder`` (call under the target's lock)."""
    removed = []
    for paths in temp_files(folder, names).values():
        for path in paths:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- folders


def temp_folder_beside(target: Path) -> Path:
    """A new empty folder ``.<name>.tmp-*`` beside ``target``, with umask modes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    follow_umask(tmp)
    return tmp


def _old_name(target: Path) -> str:
    return f".{target.name}.old-"


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` in ``target``'s place: the old folder (if any) is
    renamed to ``.<name>.old-<pid>``, ``tmp`` to ``target``, then the old one removed.

    A failure between the renames puts the old folder back; a kill there leaves it in
    ``.<name>.old-*``, where :func:`recover_folder` finds it."""
    old = None
    try:
        if target.exists():
            old = target.parent / f"{_old_name(target)}{os.getpid()}"
            os.replace(target, old)
            fault_point("between-renames", target.name)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: Path) -> list[str]:
    """Undo what a killed :func:`replace_folder` or folder writer left beside ``target``
    (call under the target's lock): a missing ``target`` is restored from its newest
    ``.<name>.old-*`` copy; other ``.old-*`` copies and every ``.<name>.tmp-*`` folder
    are removed. Returns one phrase per action, for the user."""
    done: list[str] = []
    parent = target.parent
    if not parent.is_dir():
        return done
    olds = sorted((p for p in parent.iterdir() if p.name.startswith(_old_name(target)) and p.is_dir()),
                  key=lambda p: p.stat().st_mtime_ns, reverse=True)
    if olds and not target.exists():
        os.replace(olds.pop(0), target)
        done.append(f"restored {target} from the copy an interrupted replacement left")
    for path in olds + [p for p in parent.iterdir() if p.name.startswith(temp_prefix(target)) and p.is_dir()]:
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by an interrupted write")
    return done


# --------------------------------------------------------------------------- locks


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def target_lock(target: str | Path, what: str, *, wait: bool) -> Iterator[Path]:
    """Hold ``fcntl.flock`` on ``.<name>.lock`` beside ``target`` for the ``with`` block.

    When another process holds it: with ``wait`` print one line to stderr and wait for
    it; else raise :class:`Busy` naming the target and the holder's pid. ``what``
    names this writer in messages ("hm4sr prepare"). The holder removes the lock file
    before it lets go; a waiter that then holds a removed file's lock tries again, so
    two processes never both hold the lock. A killed holder's lock ends with it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(target)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            if not wait:
                os.close(fd)
                raise Busy(f"{target}: another process (pid {holder}) is writing it ({path} is locked); "
                           f"wait for it to finish or choose another target") from None
            if not told:
                print(f"{what}: waiting for another process (pid {holder}) writing {target} to finish",
                      file=sys.stderr, flush=True)
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as it let go: lock the one now there
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock
