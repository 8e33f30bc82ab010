"""A full disk while a run writes its checkpoint, its metrics or its loss plot: one line, exit 2,
and the checkpoint and everything before it intact and resumable (see tests/disk_full.py).

How the disk fills, said per test: on Linux as root, a real ``tmpfs`` of 8 MiB in a private mount
namespace (``unshare -m``), filled at the chosen moment, so the ENOSPC is the kernel's. Where that
is not possible (not root, no ``unshare``), ENOSPC is injected into the same two write paths; the
injected run is also the slow tier's, so both paths stay exercised."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).parent / "disk_full.py"


def tmpfs_possible() -> str:
    """'' when a tmpfs can be mounted here, else why not."""
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "no unshare or mount"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"mounting a tmpfs failed: {probe.stderr.strip()[:200]}"


def drive(mode: str, root: Path) -> dict[str, dict]:
    command = [sys.executable, str(DRIVER), mode, str(root)]
    if mode == "tmpfs":
        command = ["unshare", "-m", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))
    return {report["scenario"]: report for report in json.loads(line.removeprefix("REPORT "))}


def check(reports: dict[str, dict]) -> None:
    for scenario, report in reports.items():
        assert report["code"] == 2, report
        assert len(report["stderr"]) == 1 and "No space left on device" in report["stderr"][0], report
        assert "ENOSPC" in report["stderr"][0]
        assert report["hidden"] == [], report  # no temporary file or set-aside run left behind
        assert report["config_kept"] and report["metrics"][1] == 0, report  # every metrics line whole
        assert report["resumed"] == 0 and report["resumed_step"] == 4, report  # what was kept resumes
        assert report["resumed_metrics"][1] == 0, report
    checkpoint, metrics, plot = reports["checkpoint"], reports["metrics"], reports["plot"]
    assert "could not write checkpoint" in checkpoint["stderr"][0] and "step-00000001 is intact" in checkpoint["stderr"][0]
    assert checkpoint["latest_step"] == 1
    assert "could not append to" in metrics["stderr"][0] and "metrics.jsonl" in metrics["stderr"][0]
    # The resume failed before its first checkpoint: the run is byte-for-byte as it was.
    assert metrics["latest_step"] == 1 and metrics["unchanged"] is True
    assert "loss.png" in plot["stderr"][0] and plot["latest_step"] == 3 and not plot["loss_png"]


def test_a_full_disk_during_checkpoint_metrics_and_plot_writes(tmp_path):
    reason = tmpfs_possible()
    mode = "tmpfs" if not reason else "inject"
    print(f"disk full by: {'a real 8 MiB tmpfs' if mode == 'tmpfs' else 'injected ENOSPC (' + reason + ')'}")
    check(drive(mode, tmp_path))


@pytest.mark.slow
def test_injected_enospc_reaches_the_same_outcomes(tmp_path):
    check(drive("inject", tmp_path))
