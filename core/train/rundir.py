"""A run directory changes hands only when the new run has proved itself: a ``train`` that fails
leaves the previous run's files as they were, byte for byte.

``train`` checks everything it can before it touches the directory (the config, the output path,
the memory, the data, the model, the checkpoint it resumes from). Then :class:`RunDirChange`
keeps what the previous run owns: with ``--overwrite`` its files are moved aside (a rename, in the
same directory); with ``--resume`` the files a resume rewrites (``config.yaml``, ``metrics.jsonl``,
``loss.png``) are copied aside. The new run's first complete checkpoint commits the change and
the set-aside copy is deleted; any failure before that puts it back. A process killed before its
first checkpoint leaves the copy under a hidden name carrying its process id; the next ``train``
in that directory puts it back (:func:`recover`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from isthmus.errors import IsthmusError
from isthmus.train import atomic

RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "samples.png", "checkpoints")
REWRITTEN_ON_RESUME = ("config.yaml", "metrics.jsonl", "loss.png", "samples.png")
_ASIDE = "replaced-run"


class RunDirError(IsthmusError):
    """The output directory holds another run and the user did not say what to do with it."""


def has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())


def check_output(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output_dir whose run the user did not say to resume or replace; changes nothing
    (except putting back a run an interrupted ``train`` had set aside, see :func:`recover`)."""
    recover(run_dir)
    if resume:
        if not has_checkpoints(run_dir):
            raise RunDirError(f"--resume: no checkpoint in {run_dir}/checkpoints; train without --resume first")
        return
    if has_checkpoints(run_dir) and not overwrite:
        raise RunDirError(
            f"output_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or output_dir=PATH for a new one"
        )


def recover(run_dir: Path) -> list[str]:
    """Put back what a ``train`` killed before its first checkpoint had set aside; drop what a
    ``train`` killed after it left behind. Returns what was put back."""
    if not run_dir.is_dir():
        return []
    restored: list[str] = []
    for aside in sorted(run_dir.iterdir()):
        if not (aside.name.startswith(f".{_ASIDE}") and atomic.is_stale_temp(aside)):
            continue
        marker = aside / ".committed"
        if not marker.exists():
            restored += _put_back(aside, run_dir)
        atomic.remove_tree(aside)
    if restored:
        print(f"put back {', '.join(restored)} of the previous run in {run_dir}: a `train` that would have "
              f"replaced it was stopped before its first checkpoint")
    return restored


def _put_back(aside: Path, run_dir: Path) -> list[str]:
    names = []
    for entry in sorted(aside.iterdir()):
        if entry.name.startswith("."):
            continue
        target = run_dir / entry.name
        atomic.remove_tree(target)
        os.replace(entry, target)
        names.append(entry.name)
    if names:
        atomic.fsync_dir(run_dir)
    return names


class RunDirChange:
    """What a ``train`` changes in its run directory, kept undoable until its first checkpoint.

    ``mode``: ``"new"`` (nothing to keep), ``"overwrite"`` (the run there is replaced) or
    ``"resume"`` (the run there is continued).
    """

    def __init__(self, run_dir: Path, mode: str) -> None:
        if mode not in ("new", "overwrite", "resume"):
            raise ValueError(f"mode must be new, overwrite or resume, not {mode!r}")
        self.run_dir = run_dir
        self.mode = mode
        self.aside = atomic.temp_name(run_dir / _ASIDE)
        self.kept: list[str] = []  # what the previous run had, now in the aside folder
        self.done = False

    def begin(self) -> None:
        """Set the previous run aside (overwrite) or copy what a resume rewrites (resume)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "new":
            return
        self.aside.mkdir()
        try:
            for name in RUN_FILES if self.mode == "overwrite" else REWRITTEN_ON_RESUME:
                source = self.run_dir / name
                if not source.exists() and not source.is_symlink():
                    continue
                if self.mode == "overwrite":
                    os.replace(source, self.aside / name)
                elif source.is_file():
                    shutil.copy2(source, self.aside / name)
                self.kept.append(name)
            atomic.fsync_dir(self.aside)
            atomic.fsync_dir(self.run_dir)
        except BaseException:
            self.rollback()
            raise

    def commit(self) -> None:
        """The new run has a complete checkpoint: it owns the directory now."""
        if self.done:
            return
        self.done = True
        if self.aside.exists():
            (self.aside / ".committed").touch()  # a kill during the removal must not resurrect it
            atomic.remove_tree(self.aside)

    def rollback(self) -> None:
        """Undo everything since :meth:`begin`: the previous run's files come back as they were."""
        if self.done:
            return
        self.done = True
        if self.mode == "new" or not self.aside.exists():
            return
        if self.mode == "overwrite":
            for name in RUN_FILES:  # the failed run's own files
                atomic.remove_tree(self.run_dir / name)
        else:
            for name in REWRITTEN_ON_RESUME:
                if name not in self.kept:  # written by the failed resume only
                    atomic.remove_tree(self.run_dir / name)
        _put_back(self.aside, self.run_dir)
        atomic.remove_tree(self.aside)

    def __enter__(self) -> "RunDirChange":
        self.begin()
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if error is not None:
            self.rollback()
        else:
            self.commit()


__all__ = ["REWRITTEN_ON_RESUME", "RUN_FILES", "RunDirChange", "RunDirError", "check_output", "has_checkpoints",
           "recover"]
