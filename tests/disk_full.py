"""Driver of the disk-full tests (tests/test_disk_full.py): trains a tiny run whose disk fills up
at a chosen moment, then reports as JSON what the command said and what the run directory holds.

``python disk_full.py tmpfs ROOT``: run as root inside a private mount namespace (``unshare -m``):
each scenario gets a tmpfs of its own mounted at ``ROOT/<scenario>``, and at the moment chosen a
filler file takes every free byte, so the next write fails with the kernel's own ENOSPC.
``python disk_full.py inject ROOT``: where no tmpfs can be mounted, the same moments arm fakes of
the two write paths (``isthmus.train.atomic.write_bytes`` for checkpoints and plots, the metrics
file's ``write``) that raise ``OSError(ENOSPC)``.

Scenarios (the moment the disk fills, and the write that fails):
  checkpoint: after the step-1 checkpoint; the step-2 checkpoint.
  metrics:    a resume of a one-step run, as it starts; a metrics row (tmpfs: the first one that
              needs a new page of the file, within 17 steps; no checkpoint is due before step 40).
  plot:       after the final evaluation's row; loss.png.
After the failure the disk is freed and the run resumed, to show what was kept is usable.
"""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hostile import TINY, cli, snapshot  # noqa: E402

SCENARIOS = ("checkpoint", "metrics", "plot")
TMPFS_SIZE = "8m"


class Disk:
    """Fills the disk (tmpfs mode) or arms the ENOSPC fakes (inject mode)."""

    def __init__(self, mode: str, root: Path) -> None:
        self.mode, self.root, self.armed = mode, root, False

    def fill(self) -> None:
        self.armed = True
        if self.mode != "tmpfs":
            return
        block = b"\0" * 65536
        with open(self.root / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
            try:  # the last partial block
                while True:
                    filler.write(b"\0" * 512)
            except OSError:
                pass

    def free(self) -> None:
        self.armed = False
        (self.root / "filler").unlink(missing_ok=True)


CURRENT: list[Disk] = []  # the scenario's disk, which the fakes consult


def armed() -> bool:
    return bool(CURRENT and CURRENT[0].armed)


def install_fakes() -> None:
    """ENOSPC from the write paths while the disk is "full" (inject mode only)."""
    from isthmus.train import atomic, runlog

    real_write_bytes = atomic.write_bytes

    def write_bytes(path, data):  # type: ignore[no-untyped-def]
        if armed():
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
        return real_write_bytes(path, data)

    class MetricsFile(io.TextIOWrapper):
        def write(self, text: str) -> int:
            if armed():
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return super().write(text)

    def metrics_open(path, mode="r", encoding=None):  # type: ignore[no-untyped-def]
        return MetricsFile(open(path, mode + "b"), encoding=encoding, write_through=True)

    atomic.write_bytes = write_bytes
    runlog.open = metrics_open


class Filler:
    """Trainer events that fill the disk at the scenario's moment (once ``active``)."""

    def __init__(self, scenario: str, disk: Disk, steps: int) -> None:
        self.scenario, self.disk, self.steps = scenario, disk, steps
        self.active = scenario != "metrics"  # metrics: only in the resumed run

    def moment(self, event: str, step: int) -> None:
        due = {"checkpoint": event == "checkpoint" and step == 1, "metrics": event == "start",
               "plot": event == "eval" and step == self.steps}[self.scenario]
        if self.active and due and not self.disk.armed:
            self.disk.fill()


def run_scenario(mode: str, root: Path, scenario: str) -> dict:
    from isthmus.registry import manager
    from isthmus.registry.hookspecs import hookimpl
    from isthmus.train.checkpoint import latest_checkpoint, load_checkpoint
    from isthmus.train.runlog import whole_rows

    home = root / scenario
    home.mkdir(exist_ok=True)
    if mode == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(home)], check=True)
    disk = Disk(mode, home)
    CURRENT[:] = [disk]
    steps = 3
    filler = Filler(scenario, disk, steps)

    class Plugin:
        @staticmethod
        @hookimpl
        def on_train_start(trainer):  # type: ignore[no-untyped-def]
            filler.moment("start", trainer.step)

        @staticmethod
        @hookimpl
        def on_checkpoint(trainer, step, path):  # type: ignore[no-untyped-def]
            filler.moment("checkpoint", step)

        @staticmethod
        @hookimpl
        def on_eval_end(trainer, step, metrics):  # type: ignore[no-untyped-def]
            filler.moment("eval", step)

    manager._manager, manager._registry = manager.load_plugins(autoload=False, extra=[("filler", Plugin)])
    run = home / "run"
    args = [*TINY, f"train.steps={steps}", "train.checkpoint_every=1", "train.keep_last=3", "train.log_every=100",
            f"output_dir={run}", "--no-progress"]
    before = None
    if scenario == "metrics":  # a one-step run, then a resume that fills the disk as it starts
        assert cli("train", *args, "train.steps=1").code == 0
        before = snapshot(run)
        filler.active = True
        failed = cli("train", *args, "train.steps=40", "train.checkpoint_every=0", "train.log_every=1", "--resume")
    else:
        failed = cli("train", *args)
    filler.active = False
    disk.free()
    latest = latest_checkpoint(run)
    report = {
        "mode": mode, "scenario": scenario, "code": failed.code, "stderr": failed.err.strip().splitlines(),
        "latest_step": load_checkpoint(latest).state.step if latest else None,
        "hidden": sorted(str(p.relative_to(run)) for p in run.rglob(".*")),
        "config_kept": (run / "config.yaml").is_file(),
        "metrics": [len(whole_rows(run / "metrics.jsonl")[0]), whole_rows(run / "metrics.jsonl")[1]],
        "loss_png": (run / "loss.png").exists(),
        "unchanged": snapshot(run) == before if before is not None else None,
    }
    resumed = cli("train", *args, "train.steps=4", "--resume")
    report["resumed"] = resumed.code
    report["resumed_error"] = resumed.err.strip()[-500:]
    report["resumed_step"] = load_checkpoint(run).state.step if resumed.code == 0 else None
    report["resumed_metrics"] = [len(whole_rows(run / "metrics.jsonl")[0]), whole_rows(run / "metrics.jsonl")[1]]
    manager.reset()
    return report


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    if mode == "inject":
        install_fakes()
    print("REPORT " + json.dumps([run_scenario(mode, root, scenario) for scenario in SCENARIOS]))


if __name__ == "__main__":
    main()
