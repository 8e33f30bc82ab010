"""Output paths proved writable before a command does any work.

Every path a command will write (``output_dir`` of ``train``, ``--out`` of ``eval``, ``generate``
and ``portability``, ``--output`` of ``export``, ``--report`` of ``selftest``) goes through
:func:`output_dir` or :func:`output_file` first, before any backend, data or model is built, so a
path that cannot be written costs the user one line and no time. Each is resolved and checked for
what commonly goes wrong: a name longer than the file system allows, a part of the path that is a
regular file, an existing file where a directory is wanted (or a directory where a file is), a
device or other special file, a directory the user cannot write in (``/proc``, a read-only mount),
and too little free space for what the command will write. The writability check creates and
removes one hidden probe file in the nearest existing directory; nothing else is created.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from isthmus.errors import IsthmusError
from isthmus.train import atomic

_NAME_MAX = 255  # bytes per name on every common file system
_PATH_MAX = 4096


class OutputPathError(IsthmusError):
    """An output path that cannot be written; the message names the option and the reason."""


def output_dir(path: str | os.PathLike, option: str, need_bytes: int = 0) -> Path:
    """``path`` as a directory a command may create and write in, with ``need_bytes`` free."""
    return _check(path, option, directory=True, need_bytes=need_bytes)


def output_file(path: str | os.PathLike, option: str, need_bytes: int = 0, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a file a command may write (or atomically replace), with ``need_bytes`` free;
    ``suffixes``: the name must end in one of them (``(".png",)``)."""
    checked = _check(path, option, directory=False, need_bytes=need_bytes)
    if suffixes and checked.suffix.lower() not in suffixes:
        raise OutputPathError(f"{option} {path}: the file is written as {suffixes[0].lstrip('.').upper()}, so its "
                              f"name must end in {' or '.join(suffixes)}")
    return checked


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing ancestor), or None."""
    try:
        return shutil.disk_usage(_nearest_existing(Path(path).absolute())).free
    except OSError:
        return None


def _check(path: str | os.PathLike, option: str, directory: bool, need_bytes: int) -> Path:
    text = os.fspath(path)
    if not str(text).strip():
        raise OutputPathError(f"{option}: empty path")
    if "\0" in str(text):
        raise OutputPathError(f"{option} {text!r}: a path cannot hold a NUL character")
    target = Path(text).expanduser().absolute()
    _check_lengths(target, option, text)
    kind = "directory" if directory else "file"
    mode = _mode(target)
    # The nearest existing directory above the target: where it will be created, or where it is.
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {text}: {ancestor} is a file, not a directory")
    if mode is not None:
        if directory and not stat.S_ISDIR(mode):
            raise OutputPathError(f"{option} {text}: exists and is not a directory; give a directory "
                                  f"(new or existing) for the output")
        if not directory and stat.S_ISDIR(mode):
            raise OutputPathError(f"{option} {text}: is a directory; give a file name for the output")
        if not directory and not stat.S_ISREG(mode):
            raise OutputPathError(f"{option} {text}: is not a regular file (a device, pipe or socket); "
                                  f"give a file name for the output")
    where = target if (directory and mode is not None) else ancestor
    _probe(where, option, text, kind)
    if not directory and mode is not None and not os.access(target, os.W_OK):
        raise OutputPathError(f"{option} {text}: the file exists and is not writable (check its permissions)")
    free = free_bytes(where)
    if need_bytes and free is not None and free < need_bytes:
        from isthmus.train.budget import human

        raise OutputPathError(f"{option} {text}: needs about {human(need_bytes)} free but {where} has "
                              f"{human(free)}; free some space or choose another place")
    return target


def _check_lengths(target: Path, option: str, text: str) -> None:
    if len(os.fsencode(str(target))) > _PATH_MAX:
        raise OutputPathError(f"{option}: the path is longer than {_PATH_MAX} bytes")
    for part in target.parts:
        size = len(os.fsencode(part))
        if size > _NAME_MAX:
            raise OutputPathError(f"{option} {text[:60]}...: the name {part[:40]!r}... is {size} bytes long; "
                                  f"file systems take at most {_NAME_MAX}")


def _mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as err:
        raise OutputPathError(f"{path}: {atomic.describe_os_error(err)}") from None


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        try:
            os.stat(candidate)
            return candidate
        except OSError:
            continue
    return Path(path.anchor or "/")


def _probe(directory: Path, option: str, text: str, kind: str) -> None:
    """Create and remove a hidden file in ``directory``: the only proof that writing works there."""
    if not directory.is_dir():
        raise OutputPathError(f"{option} {text}: {directory} is not a directory")
    probe = atomic.temp_name(directory / "isthmus-write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        reason = atomic.describe_os_error(err)
        if err.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            reason = f"cannot create files in {directory} ({reason})"
        raise OutputPathError(f"{option} {text}: cannot write this {kind}: {reason}") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


__all__ = ["OutputPathError", "free_bytes", "output_dir", "output_file"]
