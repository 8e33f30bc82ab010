"""The one place an ``isthmus`` command ends: every exception becomes one line and an exit code.

Every command, built-in or contributed through ``register_commands``, runs inside :func:`guarded`:

* exit 2, ``isthmus: error: <message>``: a mistake the user can fix. That is an
  :class:`~isthmus.errors.IsthmusError` (bad config, unknown name, an output that cannot be
  written, a size beyond the machine), or the operating system refusing a file we were asked to
  write (no space, no permission, a read-only file system, a name too long), with the file named.
* exit 1, ``isthmus: internal error in '<command>': ...``: anything else is a bug, in isthmus or
  in a plugin, and is said to be one: the exception, where it was raised, and whom to tell.
  Running out of memory is said as such, also with exit 1.
* ``ISTHMUS_DEBUG=1`` or ``--debug``: nothing is caught; the traceback is shown.

A command's own ``sys.exit(n)`` keeps its code; argparse's usage errors are already one line
(:class:`isthmus.cli.args.Parser`) and exit 2.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable

from isthmus.errors import IsthmusError

DEBUG_ENV = "ISTHMUS_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_USER = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

# Errors of the operating system about a path the user chose or the machine they run on.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EACCES, errno.EPERM, errno.EROFS,
                      errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EMFILE, errno.ENFILE, errno.EFBIG,
                      errno.EXDEV, errno.ELOOP}


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def guarded(command: Callable[[], str], body: Callable[[], int], debug: bool = False) -> int:
    """Run ``body`` and return its exit code; ``command()`` names the command for messages (it is
    asked only when something went wrong, so it can be decided while ``body`` runs)."""
    try:
        return body()
    except SystemExit as exc:  # argparse (--help, usage errors) or a command ending itself
        return _exit_code(exc)
    except KeyboardInterrupt:
        if debug:
            raise
        print("isthmus: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - the boundary: nothing may escape as a traceback
        if debug:
            raise
        code, line = describe(command(), exc)
        _flush_quietly()
        print(line, file=sys.stderr)
        return code


def describe(command: str, exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line for ``exc`` raised by ``command``."""
    if isinstance(exc, IsthmusError):
        return EXIT_USER, f"isthmus: error: {_one_line(exc)}"
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        from isthmus.train.atomic import describe_os_error

        path = f"{exc.filename}: " if exc.filename else ""
        return EXIT_USER, f"isthmus: error: {command}: {path}{describe_os_error(exc)}"
    where = _where(exc)
    if isinstance(exc, MemoryError):
        return EXIT_INTERNAL, (f"isthmus: error: {command}: out of memory{where}; the memory check "
                               f"did not foresee it: use smaller sizes, and report it to {report_to(exc)}")
    text = _one_line(exc)
    return EXIT_INTERNAL, (f"isthmus: internal error in '{command}': {type(exc).__name__}"
                           f"{': ' + text if text else ''}{where}; this is a bug: rerun with "
                           f"{DEBUG_ENV}=1 for the traceback and report it to {report_to(exc)}")


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(f"isthmus: error: {' '.join(str(exc.code).split())}", file=sys.stderr)
    return EXIT_INTERNAL


def _one_line(exc: BaseException, limit: int = 1500) -> str:
    try:
        text = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - a message that cannot even be printed
        text = ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frames(exc: BaseException) -> list[tuple[str, str, int]]:
    """``(module name, file, line)`` of each frame of the traceback, outermost first."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        frames.append((str(frame.f_globals.get("__name__", "")), frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _where(exc: BaseException) -> str:
    frames = _frames(exc)
    if not frames:
        return ""
    module, file, line = frames[-1]
    return f" (at {module or Path(file).name}:{line})"


def report_to(exc: BaseException) -> str:
    """Whom to tell: the authors of the plugin whose code raised it, else isthmus's issue tracker."""
    plugin = getattr(exc, "plugin", None) or _plugin_of(exc)
    return f"the authors of plugin '{plugin}'" if plugin else issue_tracker()


def _plugin_of(exc: BaseException) -> str:
    """The third-party plugin whose module the innermost of its frames belongs to, if any."""
    from isthmus.registry import manager

    registry = manager._registry  # only a registry already loaded: reporting must not load plugins
    if registry is None:
        return ""
    packages = {}
    for record in registry.plugins.values():
        top = record.module.split(":")[0].split(".")[0]
        if top and top != "isthmus":
            packages.setdefault(top, record.name)
    for module, _, _ in reversed(_frames(exc)):
        name = packages.get(module.split(".")[0])
        if name:
            return name
    return ""


def issue_tracker() -> str:
    """The ``Issues`` URL of the installed isthmus distribution, when its metadata has one."""
    try:
        from importlib import metadata

        for entry in metadata.metadata("isthmus").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in {"issues", "bug tracker", "tracker"}:
                return url.strip()
    except Exception:  # noqa: BLE001 - metadata is a courtesy here
        pass
    return "the isthmus issue tracker (include the output of `isthmus doctor`)"


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - stdout may itself be what failed (a closed pipe)
        pass


__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "EXIT_INTERNAL", "EXIT_USER", "debug_requested", "describe", "guarded",
           "issue_tracker", "report_to"]
