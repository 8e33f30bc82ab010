"""A run directory changes hands at the new run's first checkpoint (isthmus.train.rundir): a
``train`` that fails before it leaves the previous run byte-for-byte, one that fails after it
keeps the new run, and a ``train`` killed before it is undone by the next one."""

from __future__ import annotations

import shutil

import pytest

from hostile import TINY, cli, error_line, snapshot
from isthmus.registry import manager, selection
from isthmus.registry.hookspecs import hookimpl
from isthmus.train import atomic
from isthmus.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint


class Crash(RuntimeError):
    pass


def crashing_at(step: int) -> type:
    class Plugin:
        @staticmethod
        @hookimpl
        def on_step_end(trainer, step: int, metrics):  # noqa: ARG004 - the hook's signature
            if step == crash_step:
                raise Crash(f"crash at step {step}")

    crash_step = step
    return Plugin


@pytest.fixture
def crash(monkeypatch):
    def at(step: int) -> None:
        built, registry = manager.load_plugins(autoload=False, extra=[("crasher", crashing_at(step))])
        monkeypatch.setattr(manager, "_manager", built)
        monkeypatch.setattr(manager, "_registry", registry)

    yield at
    selection.clear_caches()


@pytest.fixture
def run(tmp_path, tiny_run):
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("mode, first_step", [("--overwrite", 1), ("--resume", 4)])
def test_a_failure_before_the_first_checkpoint_leaves_the_previous_run_as_it_was(run, crash, mode, first_step):
    before = snapshot(run)
    crash(first_step)  # the new run's first step: before any checkpoint of its own
    result = cli("train", *TINY, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1", f"output_dir={run}",
                 mode, "--no-progress")
    assert result.code == 1 and f"Crash: crash at step {first_step}" in error_line(result)
    assert "report it to the authors of plugin 'crasher'" in error_line(result)
    assert snapshot(run) == before  # config.yaml, metrics.jsonl, loss.png and the checkpoint, byte for byte


def test_a_failure_after_the_first_checkpoint_keeps_the_new_run(run, crash):
    old = latest_checkpoint(run)
    crash(3)
    result = cli("train", *TINY, "train.steps=6", "train.checkpoint_every=2", f"output_dir={run}", "--overwrite",
                 "--no-progress")
    assert result.code == 1
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]  # the new run's; the old one is gone
    assert load_checkpoint(run).state.config["train"]["steps"] == 6 and old.name == "step-00000003"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # nothing set aside is left


def test_a_train_killed_before_its_first_checkpoint_is_undone_by_the_next(run, monkeypatch):
    from isthmus.train.rundir import RunDirChange

    before = snapshot(run)
    dead = 2**22 + 12345  # above any pid_max the kernel allows
    monkeypatch.setattr(atomic.os, "getpid", lambda: dead)
    change = RunDirChange(run, "overwrite")
    change.begin()  # what a `train --overwrite` did before it was killed with SIGKILL
    (run / "config.yaml").write_text("the new run's, never finished\n")
    monkeypatch.undo()
    assert not (run / "checkpoints").exists()
    result = cli("train", *TINY, f"output_dir={run}")
    assert result.code == 2 and "already holds a run" in error_line(result)
    assert "put back checkpoints, config.yaml, loss.png, metrics.jsonl of the previous run" in result.out
    assert snapshot(run) == before


def test_a_plugin_that_exits_during_training_is_a_named_failure_not_a_success(run, monkeypatch):
    class Exiting:
        @staticmethod
        @hookimpl
        def on_step_end(trainer, step, metrics):  # noqa: ARG004
            raise SystemExit(0)

    built, registry = manager.load_plugins(autoload=False, extra=[("quitter", Exiting)])
    monkeypatch.setattr(manager, "_manager", built)
    monkeypatch.setattr(manager, "_registry", registry)
    before = snapshot(run)
    result = cli("train", *TINY, "train.steps=4", f"output_dir={run}", "--overwrite", "--no-progress")
    assert result.code == 1
    line = error_line(result)
    assert "PluginHookError: plugin 'quitter' failed in on_step_end: called sys.exit(0)" in line
    assert "report it to the authors of plugin 'quitter'" in line
    assert snapshot(run) == before
