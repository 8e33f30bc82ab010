"""Fault tolerance as a user meets it: a resume with another model is refused naming the key, and
the kill-and-resume harness (SIGKILL at random steps, resume, bitwise equal final weights).

The checkpoint-write failures (disk full, permission denied, a kill during the save) are covered in
tests/test_checkpoint.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0",
]
HARNESS = Path(__file__).resolve().parents[1] / "bench" / "kill_resume.py"


def isthmus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=300)


def test_resume_with_another_model_is_refused_naming_the_key_and_both_values(tmp_path):
    trained = isthmus("train", *TINY, "train.steps=1", f"output_dir={tmp_path}", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    result = isthmus("train", *TINY, "train.steps=2", "model.d_model=48", f"output_dir={tmp_path}", "--no-progress", "--resume")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.d_model is 32 in the checkpoint but 48 now" in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_resume_harness_three_trials(kill_seed):
    result = subprocess.run([sys.executable, str(HARNESS), "--trials", "3", "--steps", "10", "--seed", str(kill_seed)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 passed" in result.stdout, result.stdout
