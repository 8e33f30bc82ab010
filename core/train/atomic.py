"""Durable file writes: write, fsync, rename, so a crash leaves the old version or the new one.

Every function here lets ``OSError`` through unchanged; callers decide what to tell the user.
Callers look these functions up as module attributes (``atomic.write_bytes``) so tests can replace
one of them to simulate a full disk or a crash at a precise point.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["write_bytes", "write_bytes_atomic", "fsync_dir", "rename", "write_text_atomic", "remove_tree", "temp_name",
           "temp_owner", "is_stale_temp", "describe_os_error", "describe_dir"]

_TEMP_MARK = ".tmp-"
_OS_HINTS = {errno.ENOSPC: "free some disk space", getattr(errno, "EDQUOT", -1): "raise the disk quota",
             errno.EACCES: "check write permission", errno.EPERM: "check write permission",
             errno.EROFS: "the file system is read-only"}


def write_bytes(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Create ``path`` (it must not exist), write all of ``data`` and fsync it before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            # os.write may write less than asked (signals, pipes); loop until it is all out.
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a rename or a new file inside it survives a power cut."""
    if os.name == "nt":  # Windows cannot open a directory for fsync; NTFS journals renames itself.
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (a file, or a directory onto a name that does not exist) and fsync
    the parent so the new name is on disk."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def temp_name(final: Path, tag: str = "") -> Path:
    """The sibling used while ``final`` is being built (or torn down, with a ``tag``): hidden, and
    carrying our process id so a later writer can tell a dead process's leftovers from live work."""
    return final.with_name(f".{final.name}{tag}{_TEMP_MARK}{os.getpid()}")


def temp_owner(path: Path) -> int | None:
    """The process id in a name made by :func:`temp_name`, or None if ``path`` is not such a name."""
    name = path.name
    if not name.startswith(".") or _TEMP_MARK not in name:
        return None
    tail = name.rsplit(_TEMP_MARK, 1)[1]
    return int(tail) if tail.isdigit() else None


def is_stale_temp(path: Path) -> bool:
    """True for a :func:`temp_name` entry left by this process or by one that no longer runs."""
    pid = temp_owner(path)
    if pid is None:
        return False
    if pid == os.getpid() or os.name == "nt":  # there os.kill(pid, 0) sends Ctrl-C.
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True
    except OSError:  # EPERM: the process exists but belongs to someone else.
        return False
    return False


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` so readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write_bytes(tmp, data)
        rename(tmp, path)
    except BaseException:
        remove_tree(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree if it exists; best effort, since it only tidies up."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def describe_os_error(err: OSError) -> str:
    """``"No space left on device (ENOSPC: free some disk space)"``: the reason, its code, a hint."""
    notes = [note for note in (errno.errorcode.get(err.errno or 0), _OS_HINTS.get(err.errno or 0)) if note]
    return f"{err.strerror or err}" + (f" ({': '.join(notes)})" if notes else "")


def describe_dir(directory: Path, limit: int = 8) -> str:
    """One line saying what ``directory`` holds, for errors about a file that is not there."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(directory).iterdir())
    except OSError:
        return f"{directory} does not exist either"
    if not names:
        return f"{directory} is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{directory} has: {', '.join(names[:limit])}{more}"
