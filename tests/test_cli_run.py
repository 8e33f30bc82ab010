"""``isthmus train | eval | caption`` as a user runs them, including every user-error path."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from isthmus.train.checkpoint import latest_checkpoint, load_checkpoint

TINY = [
    "backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1",
]


def isthmus(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = isthmus("train", *TINY, "train.steps=3", "train.eval_every=0", "train.checkpoint_every=0", f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "held-out: caption exact match" in result.stdout
    return run_dir


def test_train_writes_the_run_files(trained):
    assert {p.name for p in trained.iterdir()} >= {"config.yaml", "metrics.jsonl", "loss.png", "checkpoints"}
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(trained).state.step == 3


def test_eval_and_caption_use_the_checkpoint(trained, tmp_path):
    result = isthmus("eval", "--checkpoint", str(trained), "--max-samples", "8")
    assert result.returncode == 0, result.stderr
    assert "step 3" in result.stdout and "exact match" in result.stdout
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(image)
    result = isthmus("caption", "--checkpoint", str(trained), "--image", str(image))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and len(result.stdout.strip().splitlines()) == 1


def test_eval_on_the_reference_backend_matches_torch(trained):
    def evaluation(*backend: str) -> list[str]:
        lines = isthmus("eval", "--checkpoint", str(trained), "--max-samples", "8", *backend).stdout.splitlines()
        return lines[1:]  # the headline and the examples, after the line naming the backend

    torch_out, reference_out = evaluation(), evaluation("backend=reference")
    assert torch_out[0].startswith("held-out: caption exact match")
    assert torch_out == reference_out  # printed to 0.1% / 4 decimals


def test_eval_takes_a_backend_config_file_and_refuses_other_sections(trained, tmp_path):
    (tmp_path / "site.yaml").write_text("backend: {name: reference}\n")
    result = isthmus("eval", "--checkpoint", str(trained), "--max-samples", "8", "--config", str(tmp_path / "site.yaml"))
    assert result.returncode == 0, result.stderr
    assert "on reference/numpy" in result.stdout.splitlines()[0]
    (tmp_path / "run.yaml").write_text("backend: cpu\ntrain: {steps: 5}\n")
    one_line_error(isthmus("eval", "--checkpoint", str(trained), "--config", str(tmp_path / "run.yaml")),
                   "run.yaml: only the backend section applies to a checkpoint, not train")


def test_train_reads_its_config_file(trained, tmp_path):
    # The file's output_dir holds a run already: refused before any training, so this stays quick.
    (tmp_path / "run.yaml").write_text(f"output_dir: {trained}\ntrain: quick\n")
    one_line_error(isthmus("train", "--config", str(tmp_path / "run.yaml"), *TINY), str(trained), "--resume")


def test_existing_run_dir_needs_resume_or_overwrite(trained):
    one_line_error(isthmus("train", *TINY, f"output_dir={trained}"), str(trained), "--resume", "--overwrite")


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(trained):
    before = {p.relative_to(trained): p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    # The data options are read after the run directory is checked: an error there must not have
    # removed the run that --overwrite would replace.
    result = isthmus("train", *TINY, "data=image-folder", "data.path=/nonexistent/scenes", f"output_dir={trained}",
                     "--overwrite")
    one_line_error(result, "/nonexistent/scenes")
    after = {p.relative_to(trained): p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    assert after == before


def test_resume_without_a_checkpoint(tmp_path):
    one_line_error(isthmus("train", *TINY, f"output_dir={tmp_path}", "--resume"), "no checkpoint")


def test_eval_of_a_missing_checkpoint(tmp_path):
    one_line_error(isthmus("eval", "--checkpoint", str(tmp_path / "nope")), "nope")


def test_eval_refuses_model_overrides(trained):
    one_line_error(isthmus("eval", "--checkpoint", str(trained), "model.d_model=64"), "model.d_model=64", "only backend overrides")


def test_eval_of_a_truncated_checkpoint(trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    model_file = latest_checkpoint(copy) / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    one_line_error(isthmus("eval", "--checkpoint", str(copy)), "model.safetensors")


def test_caption_of_a_missing_or_corrupt_image(trained, tmp_path):
    one_line_error(isthmus("caption", "--checkpoint", str(trained), "--image", str(tmp_path / "none.png")), "none.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    one_line_error(isthmus("caption", "--checkpoint", str(trained), "--image", str(bad)), "bad.png", "not a readable image")


def test_training_on_a_forward_only_backend_is_refused(tmp_path):
    one_line_error(isthmus("train", *TINY, "backend=reference", f"output_dir={tmp_path}"), "reference", "forward only")


def test_bad_training_override(tmp_path):
    one_line_error(isthmus("train", *TINY, "train.precision=fp8", f"output_dir={tmp_path}"), "train.precision", "bf16")


def test_sigkill_at_a_random_step_leaves_a_loadable_checkpoint_that_resumes(tmp_path, kill_seed):
    steps = 40
    args = [*TINY, f"train.steps={steps}", "train.checkpoint_every=1", "train.keep_last=2", "train.eval_every=0", f"output_dir={tmp_path}", "--no-progress"]
    kill_after = random.Random(kill_seed).randint(2, 20)
    print(f"SIGKILL once a checkpoint of step {kill_after} or later is written")
    process = subprocess.Popen([sys.executable, "-m", "isthmus.cli", "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            latest = latest_checkpoint(tmp_path) if (tmp_path / "checkpoints").exists() else None
            if latest is not None and int(latest.name.split("-")[1]) >= kill_after:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"training ended before the kill: {process.stderr.read().decode()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(tmp_path).state.step
    print(f"killed after the checkpoint of step {killed_at}")
    assert killed_at >= kill_after
    result = isthmus("train", *args, "--resume")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path).state.step == steps
