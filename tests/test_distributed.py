"""Data parallel (``distributed=ddp``): rank slices, the launcher environment, and real runs of two
CPU processes under torchrun with gloo: same loss and weights as one process, and a killed rank
ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from isthmus.train.checkpoint import load_checkpoint
from isthmus.config.composer import ConfigError
from isthmus.train.parallel import RankSlice, device_index, launch_env, token_count

TINY = [
    "backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "model.dropout=0.0", "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1",
    "train.eval_every=0", "train.log_every=1",
]


def compose(overrides=(), **ignored):
    """A config composed as the command line composes it, over the built-in plugins."""
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run

    return compose_run(load_plugins(autoload=False)[1], overrides)



def isthmus(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "isthmus.cli", "train", "distributed=ddp", *args]


# -- pieces ------------------------------------------------------------------------------------
class Batches:
    def __init__(self) -> None:
        self.n = 0

    def __next__(self):
        self.n += 1
        return {"indices": np.arange(8) + 8 * self.n, "targets": np.where(np.arange(16).reshape(8, 2) % 3, 1, -100)}

    def state(self):
        return {"step": self.n}


def test_rank_slices_tile_the_global_batch():
    whole = Batches().__next__()
    parts = [next(RankSlice(Batches(), rank, 2)) for rank in (0, 1)]
    assert np.array_equal(np.concatenate([p["indices"] for p in parts]), whole["indices"])
    assert sum(token_count(p) for p in parts) == token_count(whole) == 10
    sliced = RankSlice(Batches(), 1, 2)
    next(sliced)
    assert sliced.state() == {"step": 1}  # the global position, the same on every rank


def test_launch_env_and_device_mapping():
    assert launch_env({}) is None
    env = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert device_index(1, None, {}) == 1
    assert device_index(1, "CUDA_VISIBLE_DEVICES", {"CUDA_VISIBLE_DEVICES": "2,3"}) == 1
    assert device_index(1, "ASCEND_RT_VISIBLE_DEVICES", {"ASCEND_RT_VISIBLE_DEVICES": "5"}) == 0  # one device shown per process
    assert device_index(1, "CUDA_VISIBLE_DEVICES", {"ASCEND_RT_VISIBLE_DEVICES": "5"}) == 1  # another device's variable


def test_distributed_is_a_checked_choice():
    assert str(compose(["distributed=ddp"]).distributed) == "ddp"
    assert str(compose(["distributed=fsdp"]).distributed) == "fsdp"
    with pytest.raises(ConfigError, match="distributed"):
        compose(["distributed=zero3"])


def test_ddp_without_a_launcher_says_how_to_launch(tmp_path):
    result = isthmus("train", *TINY, "train.steps=1", "distributed=ddp", f"output_dir={tmp_path}", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert "torchrun --nproc-per-node" in result.stderr and "Traceback" not in result.stderr


# -- two processes -----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    steps = ["train.steps=4"]
    single = isthmus("train", *TINY, *steps, f"output_dir={tmp_path / 'one'}", "--no-progress")
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(torchrun(*TINY, *steps, f"output_dir={tmp_path / 'two'}", "--no-progress"),
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    assert "data parallel: 2 processes, gloo, global batch 8 (4 per process)" in ddp.stdout
    one, two = (load_checkpoint(tmp_path / name) for name in ("one", "two"))
    assert one.state.step == two.state.step == 4
    assert one.state.data_position == two.state.data_position
    # Summation order differs (two partial sums, then all-reduce), and AdamW divides by sqrt(v): an
    # element whose gradient is near zero turns a 1e-7 relative difference into a visible one. So:
    # every weight within 1e-4 of the single-process one, and nearly all within float32 rounding.
    worst, close, total = 0.0, 0, 0
    for name, weight in one.params.items():
        diff = np.abs(two.params[name] - weight)
        worst = max(worst, float(diff.max()))
        close += int(np.count_nonzero(diff <= 1e-6 + 1e-5 * np.abs(weight)))
        total += diff.size
    print(f"ddp vs single process after 4 steps: max |dw| {worst:.2e}, {close}/{total} weights within float32 rounding")
    assert worst < 1e-4 and close >= 0.999 * total
    losses = [[r["loss"] for r in map(eval_json, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"] for name in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_killing_one_rank_ends_the_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(*TINY, "train.steps=100000", "train.checkpoint_every=0", "distributed_timeout_s=30",
                                     f"output_dir={run_dir}", "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        killed_at = time.monotonic()
        os.kill(max(ranks), signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert took < 60
    assert "Signal 9 (SIGKILL)" in out and "isthmus.cli FAILED" in out, out[-3000:]
    print(f"killed rank ended the job in {took:.1f} s, exit code {proc.returncode}")


@pytest.mark.slow
def test_two_ranks_resume_a_single_process_checkpoint(tmp_path):
    import shutil

    args = [*TINY, "train.steps=4", "train.checkpoint_every=1", "train.keep_last=10"]
    single = isthmus("train", *args, f"output_dir={tmp_path / 'one'}", "--no-progress")
    assert single.returncode == 0, single.stderr
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    for step in (3, 4):  # back to step 2: the latest pointer falls back to the newest complete one
        shutil.rmtree(tmp_path / "two" / "checkpoints" / f"step-{step:08d}")
    ddp = subprocess.run(torchrun(*args, f"output_dir={tmp_path / 'two'}", "--no-progress", "--resume"), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    one, two = (load_checkpoint(tmp_path / name) for name in ("one", "two"))
    assert two.state.step == 4 and two.state.data_position == one.state.data_position
    for name, weight in one.params.items():
        assert np.max(np.abs(two.params[name] - weight)) < 1e-4, name


@pytest.mark.slow
def test_mindspore_two_ranks_under_msrun_match_one_process(tmp_path):
    import importlib
    import socket

    cli_file = importlib.import_module("isthmus.cli.main").__file__

    msrun = Path(sys.executable).parent / "msrun"  # MindSpore's launcher, a script of its wheel
    assert msrun.exists(), f"{msrun} is missing: the mindspore wheel installs it (make venv)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, "backend.engine=mindspore", "train.steps=3"]
    single = isthmus("train", *args, f"output_dir={tmp_path / 'one'}", "--no-progress")
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "GLOG_v": "3"}
    ddp = subprocess.run([str(msrun), "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(port),
                          "--log_dir", str(tmp_path / "logs"), "--join", "True", cli_file, "train", *args,
                          "distributed=ddp", f"output_dir={tmp_path / 'two'}", "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    one, two = (load_checkpoint(tmp_path / name) for name in ("one", "two"))
    assert two.state.step == 3 and two.state.data_position == one.state.data_position
    for name, weight in one.params.items():
        assert np.max(np.abs(two.params[name] - weight)) < 1e-4, name
