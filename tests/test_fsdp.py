"""Sharded training (``distributed=fsdp``, torch FSDP2) and activation recomputation
(``train.recompute``): the same numbers as one process, sharded checkpoints that reshard and
consolidate, the memory estimate and its refusal.

Fast tests run FSDP in this process as a group of one (gloo); the multi-rank ones start torchrun
and are in the slow tier."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from isthmus.nn.params import BlockParams, Scope
from isthmus.train.checkpoint import CheckpointError, load_checkpoint, read_manifest

DECODER = ["model=llama", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
           "model.num_attention_heads=4", "model.num_key_value_heads=2", "data.num_train=64", "data.num_eval=16",
           "backend=cpu", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1"]


def isthmus(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def torchrun(nproc: int, *args: str, strategy: str = "fsdp") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "isthmus.cli", "train", f"distributed={strategy}", *args]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


def weights_agree(one: dict, two: dict) -> tuple[float, int, int]:
    """(max |dw|, weights within float32 rounding, weights): see tests/test_distributed.py for why
    nearly all, not all, weights are within rounding after AdamW."""
    worst, close, total = 0.0, 0, 0
    for name, weight in one.items():
        diff = np.abs(two[name] - weight)
        worst = max(worst, float(diff.max()))
        close += int(np.count_nonzero(diff <= 1e-6 + 1e-5 * np.abs(weight)))
        total += diff.size
    return worst, close, total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def group_of_one(monkeypatch):
    """The launcher's environment for a one-rank group in this process."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def train_here(tmp_path: Path, *overrides: str, resume: Path | None = None):
    """Train in this process as ``isthmus train`` does (rank 0 of a group, when one is set)."""
    from isthmus.registry.manager import load_plugins
    from isthmus.train import parallel
    from isthmus.train.run import compose_run, prepare
    from isthmus.train.trainer import Trainer

    registry = load_plugins(autoload=False)[1]
    cfg = compose_run(registry, [*DECODER, f"output_dir={tmp_path}", *overrides])
    run = prepare(cfg, registry)
    comm = parallel.start(cfg, run.backend)
    try:
        trainer = Trainer(run, tmp_path, comm=comm, resume=resume)
        result = trainer.fit()
    finally:
        if comm is not None:
            comm.close()
    return trainer, result


# -- the seam --------------------------------------------------------------------------------
def test_scope_run_calls_the_block_or_hands_it_to_block_params():
    params = {"layers.0.w": 2.0, "layers.1.w": 3.0}
    assert Scope(params, "layers.1").run(lambda scope, x: scope["w"] * x, 5.0) == 15.0

    class Counting(BlockParams):
        def __init__(self):
            self.seen = []

        def __getitem__(self, name):
            return params[name]

        def __iter__(self):
            return iter(params)

        def __len__(self):
            return len(params)

        def run_block(self, prefix, fn, scope, args):
            self.seen.append(prefix)
            return fn(scope, *args) + 1.0

    counting = Counting()
    assert Scope(counting, "layers.0").run(lambda scope, x: scope["w"] * x, 5.0) == 11.0
    assert counting.seen == ["layers.0"]


def test_the_decoder_names_its_blocks_and_runs_each_through_its_scope(monkeypatch):
    from isthmus.models.decoder_lm.model import DecoderLM

    model = DecoderLM({"name": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
                       "num_attention_heads": 2, "num_key_value_heads": 1}, vocab_size=11)
    assert model.blocks() == ["layers.0", "layers.1", "layers.2"]
    ran = []
    original = Scope.run
    monkeypatch.setattr(Scope, "run", lambda self, fn, *args: (ran.append(self.prefix), original(self, fn, *args))[1])
    from isthmus.verify.conformance import reference_backend

    kernels, engine = reference_backend()
    params = {n: engine.asarray(a) for n, a in model.initial_parameters(0).items()}
    model.forward(kernels, params, {"tokens": engine.asarray(np.array([[1, 2, 3]]))})
    assert ran == model.blocks()


# -- recompute -------------------------------------------------------------------------------
def test_recompute_gives_the_same_losses_and_weights_and_keeps_fewer_activations(tmp_path):
    import torch

    plain, _ = train_here(tmp_path / "plain", "train.steps=3")
    again, _ = train_here(tmp_path / "recompute", "train.steps=3", "train.recompute=true")
    assert losses(tmp_path / "recompute") == losses(tmp_path / "plain")  # the same ops in the same order
    for name, p in plain.params.items():
        assert torch.equal(again.params[name], p), name

    def saved_bytes(trainer, recompute: bool) -> int:
        """Bytes of the tensors autograd keeps for the backward pass of one forward."""
        from isthmus.train.evaluate import to_device

        backend, model = trainer.run.backend, trainer.run.model
        batch = to_device(backend, next(trainer.run.data.train.iter_batches(8, seed=0)))
        params = backend.engine.recompute(model, trainer.params) if recompute else trainer.params
        weights = {p.untyped_storage().data_ptr() for p in trainer.params.values()}
        storages: dict[int, int] = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.loss(backend.kernels, params, batch)
        return sum(storages.values())

    kept, recomputed = saved_bytes(plain, False), saved_bytes(plain, True)
    assert recomputed < 0.5 * kept, (recomputed, kept)


def test_mindspore_recompute_runs_each_block_twice_with_the_same_losses(tmp_path, monkeypatch):
    from isthmus.backends.mindspore import recompute

    runs = []
    original = recompute.BlockCell.construct
    monkeypatch.setattr(recompute.BlockCell, "construct", lambda self, *a: (runs.append(1), original(self, *a))[1])
    ms = ["backend.engine=mindspore", "backend.options.mode=pynative", "train.steps=2"]
    train_here(tmp_path / "plain", *ms)
    assert runs == []
    train_here(tmp_path / "recompute", *ms, "train.recompute=true")
    assert len(runs) == 2 * 2 * 2  # 2 blocks x 2 steps, each run forward and again in the backward pass
    assert losses(tmp_path / "recompute") == losses(tmp_path / "plain")


# -- memory ----------------------------------------------------------------------------------
def test_the_estimate_divides_sharded_state_and_matches_the_shards_held(tmp_path, group_of_one):
    from isthmus.registry.manager import load_plugins
    from isthmus.train.memory import estimate
    from isthmus.train.run import compose_run, prepare

    registry = load_plugins(autoload=False)[1]
    model = prepare(compose_run(registry, [*DECODER, f"output_dir={tmp_path}"]), registry).model
    specs, blocks = model.param_specs(), model.blocks()
    whole = estimate(specs, blocks, "ddp", 4, 64, "float32", False)
    quarter = estimate(specs, blocks, "fsdp", 4, 64, "float32", False)
    count = sum(int(np.prod(s.shape)) for s in specs.values())
    assert whole.parameters == 4 * count and whole.optimizer == 8 * count
    assert abs(quarter.states - whole.states / 4) <= 0.1 * whole.states / 4
    # A group of one holds every row: the shards its checkpoint writes are the whole state.
    trainer, _ = train_here(tmp_path / "one", "train.steps=1", "distributed=fsdp")
    held = sum(p.to_local().untyped_storage().nbytes() for p in trainer.params.values())
    assert held == estimate(specs, blocks, "fsdp", 1, 64, "float32", False).parameters


def test_a_rank_over_its_device_is_refused_naming_the_strategy_that_fits(tmp_path):
    from isthmus.registry.manager import load_plugins
    from isthmus.train.memory import MemoryLimitError, estimate, refuse_if_too_big
    from isthmus.train.run import compose_run, prepare

    registry = load_plugins(autoload=False)[1]
    model = prepare(compose_run(registry, [*DECODER, f"output_dir={tmp_path}"]), registry).model
    inputs = {"specs": model.param_specs(), "blocks": model.blocks(), "tokens_per_rank": 64,
              "compute_dtype": "float32", "vocab": 0}
    ddp = estimate(strategy="ddp", world=4, recompute=False, **inputs)
    fsdp = estimate(strategy="fsdp", world=4, recompute=False, **inputs)
    refuse_if_too_big(ddp, ddp.total, **inputs)  # fits exactly: nothing to say
    with pytest.raises(MemoryLimitError, match=r"exceeds the device's .*; distributed=fsdp on 4 ranks fits"):
        refuse_if_too_big(ddp, (ddp.total + fsdp.total) // 2, **inputs)


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_what_would(tmp_path):
    big = ["model.hidden_size=8192", "model.intermediate_size=28672", "model.num_hidden_layers=80",
           "model.num_attention_heads=64", "model.num_key_value_heads=8"]
    result = isthmus("train", *DECODER, *big, "train.steps=1", f"output_dir={tmp_path}", "--no-progress", timeout=120)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in result.stderr, result.stderr
    # The host's budget refuses first; the per-rank estimate names what would fit one rank's device.
    assert "needs about" in line[0] and "per rank, distributed=fsdp train.recompute=true on" in line[0], line[0]
    assert not (tmp_path / "checkpoints").exists()


# -- fsdp in one process ---------------------------------------------------------------------
def test_fsdp_group_of_one_matches_the_plain_trainer_and_writes_a_sharded_checkpoint(tmp_path, group_of_one):
    train_here(tmp_path / "plain", "train.steps=3")
    sharded, _ = train_here(tmp_path / "fsdp", "train.steps=3", "distributed=fsdp")
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"), rtol=1e-6)
    files = read_manifest(tmp_path / "fsdp")
    assert files["sharded"]["world_size"] == 1 and files["sharded"]["format"] == "torch.distributed.checkpoint"
    with pytest.raises(CheckpointError, match="is sharded .*resume it with distributed=fsdp.*isthmus convert"):
        load_checkpoint(tmp_path / "fsdp")


@pytest.mark.slow  # four runs, three conversions; the group-of-one test keeps a sharded checkpoint fast
def test_a_sharded_checkpoint_resumes_and_consolidates(tmp_path, group_of_one):
    constant = "train.schedule=constant"  # the lr of a step does not depend on train.steps
    train_here(tmp_path / "through", "train.steps=4", "train.checkpoint_every=2", constant)
    train_here(tmp_path / "split", "train.steps=2", "distributed=fsdp", constant)
    train_here(tmp_path / "split", "train.steps=4", "distributed=fsdp", constant, resume=tmp_path / "split")
    np.testing.assert_allclose(losses(tmp_path / "split"), losses(tmp_path / "through"), rtol=1e-6)
    converted = isthmus("convert", str(tmp_path / "split"), "--to", "isthmus", "--output", str(tmp_path / "whole"))
    assert converted.returncode == 0, converted.stderr
    for source, out in ((tmp_path / "split", "hf-from-shards"), (tmp_path / "whole", "hf-from-whole")):
        to_hf = isthmus("convert", str(source), "--to", "hf", "--output", str(tmp_path / out))
        assert to_hf.returncode == 0, to_hf.stderr
    from safetensors.numpy import load_file

    a, b = (load_file(next((tmp_path / out).glob("*.safetensors"))) for out in ("hf-from-shards", "hf-from-whole"))
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    whole, through = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "through")
    assert whole.state.step == 4 and whole.state.data_position == through.state.data_position
    assert set(whole.optimizer_tensors) == set(through.optimizer_tensors)
    worst, close, total = weights_agree(through.params, whole.params)
    assert worst < 1e-5 and close == total


def test_fsdp_bf16_keeps_float32_shards_and_moments(tmp_path, group_of_one):
    import torch

    train_here(tmp_path / "plain", "train.steps=2", "train.precision=bf16")
    sharded, _ = train_here(tmp_path / "fsdp", "train.steps=2", "train.precision=bf16", "distributed=fsdp")
    assert {p.dtype for p in sharded.params.values()} == {torch.float32}  # the master weights
    assert {m.dtype for m in sharded.optimizer.exp_avg.values()} == {torch.float32}
    # bf16 compute in both; FSDP casts at the gather and reduces in float32, the policy casts in the loss.
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"), rtol=2e-2)


def test_fsdp_without_a_launcher_says_how_to_launch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RANK_ID", "RANK_SIZE")}
    result = isthmus("train", *DECODER, "train.steps=1", "distributed=fsdp", f"output_dir={tmp_path}", "--no-progress",
                     env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "torchrun --nproc-per-node N -m isthmus.cli train distributed=fsdp" in lines[0], lines


# -- several ranks (torchrun) ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_match_one_process_over_20_steps(tmp_path, ranks):
    steps = ["train.steps=20"]
    single = isthmus("train", *DECODER, *steps, f"output_dir={tmp_path / 'one'}", "--no-progress")
    assert single.returncode == 0, single.stderr
    run = subprocess.run(torchrun(ranks, *DECODER, *steps, f"output_dir={tmp_path / 'many'}", "--no-progress"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"fully sharded data parallel (torch FSDP2): {ranks} processes, gloo" in run.stdout
    assert f"memory per rank (estimate, fsdp on {ranks} ranks): parameters" in run.stdout.split("done:")[0]
    np.testing.assert_allclose(losses(tmp_path / "many"), losses(tmp_path / "one"), rtol=1e-5)
    shards = sorted((read_state_dir(tmp_path / "many") / "shards").glob("__*_0.distcp"))
    assert len(shards) == ranks  # every rank wrote its own part, about 1/N of the whole
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 1.5 * sum(sizes) / ranks, sizes
    converted = isthmus("convert", str(tmp_path / "many"), "--to", "isthmus", "--output", str(tmp_path / "whole"))
    assert converted.returncode == 0, converted.stderr
    one = load_checkpoint(tmp_path / "one").params
    worst, close, total = weights_agree(one, load_checkpoint(tmp_path / "whole").params)
    # The scale of float32 reorder rounding, measured: DDP on the same ranks sums the same partial
    # gradients with nothing sharded, and AdamW magnifies where a gradient is near zero.
    ddp = subprocess.run(torchrun(ranks, *DECODER, *steps, f"output_dir={tmp_path / 'ddp'}", "--no-progress",
                                  strategy="ddp"), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    rounding, _, _ = weights_agree(one, load_checkpoint(tmp_path / "ddp").params)
    print(f"fsdp on {ranks} ranks vs one process after 20 steps: max |dw| {worst:.2e} (ddp {rounding:.2e}), "
          f"{close}/{total} within rounding")
    assert worst <= 2 * max(rounding, 1e-7) and close >= 0.999 * total


BLOCKS_MODULE = """
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(self.norm(x)).relu()


class Net(nn.Module):
    def __init__(self, classes=3, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(3)])
        self.head = nn.Linear(width, classes)

    def forward(self, images):
        return self.head(self.blocks(self.pool(self.stem(images)).flatten(1)))


def build(**kwargs):
    return Net(**kwargs)
"""


@pytest.mark.slow
def test_a_torch_module_shards_its_block_classes_and_matches_one_process(tmp_path):
    (tmp_path / "blocknet.py").write_text(BLOCKS_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    args = ["model=torch-module", "model.factory=blocknet:build", "model.blocks=[Block]", "model.loss=cross_entropy",
            "data=example-shapes", "data.num_train=64", "data.num_eval=16", "backend=cpu", "train.batch_size=8",
            "train.warmup_steps=1", "train.lr=1e-2", "train.eval_every=0", "train.log_every=1", "train.steps=6",
            "--no-progress"]
    single = isthmus("train", *args, f"output_dir={tmp_path / 'one'}", env=env)
    assert single.returncode == 0, single.stderr
    run = subprocess.run(torchrun(2, *args, "train.recompute=true", f"output_dir={tmp_path / 'two'}"),
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    tensors = read_manifest(tmp_path / "two")["sharded"]["tensors"]
    assert "blocks.0.fc.weight" in tensors and "head.weight" in tensors


def read_state_dir(run_dir: Path) -> Path:
    from isthmus.train.checkpoint import resolve

    return resolve(run_dir)


@pytest.mark.slow
def test_four_ranks_reshard_to_two_and_one_and_consolidate_for_mindspore(tmp_path):
    through = isthmus("train", *DECODER, "train.steps=6", "train.schedule=constant", f"output_dir={tmp_path / 'one'}",
                      "--no-progress")
    assert through.returncode == 0, through.stderr
    for ranks, steps in ((4, 2), (2, 4), (1, 6)):
        resume = ["--resume"] if ranks != 4 else []
        run = subprocess.run(torchrun(ranks, *DECODER, f"train.steps={steps}", "train.schedule=constant",
                                      f"output_dir={tmp_path / 'run'}",
                                      "--no-progress", *resume), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert read_manifest(tmp_path / "run")["sharded"]["world_size"] == ranks
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(tmp_path / "one"), rtol=1e-5)
    # Consolidated, it continues on one process and on MindSpore.
    converted = isthmus("convert", str(tmp_path / "run"), "--to", "isthmus", "--output", str(tmp_path / "whole"))
    assert converted.returncode == 0, converted.stderr
    more = ["train.steps=8", "train.schedule=constant", "--no-progress"]
    runs = {}
    for engine in ("torch", "mindspore"):
        out = tmp_path / f"on-{engine}"
        resumed = isthmus("train", *DECODER, f"backend.engine={engine}", *more, f"output_dir={out}",
                          "--resume", str(tmp_path / "whole"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        runs[engine] = losses(out)
    assert len(runs["torch"]) == len(runs["mindspore"]) == 2  # steps 7 and 8
    np.testing.assert_allclose(runs["mindspore"], runs["torch"], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    wide = ["model.hidden_size=256", "model.intermediate_size=1024", "model.num_hidden_layers=4",
            "model.num_attention_heads=4", "model.num_key_value_heads=2"]
    checkpoints = tmp_path / "run" / "checkpoints"
    job = subprocess.Popen(torchrun(2, *DECODER, *wide, "train.steps=50", "train.checkpoint_every=1",
                                    "distributed_timeout_s=20", f"output_dir={tmp_path / 'run'}", "--no-progress"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    deadline = time.monotonic() + 240
    try:
        while killed is None and time.monotonic() < deadline and job.poll() is None:
            done = [p for p in checkpoints.glob("step-*") if (p / "state.json").is_file()] if checkpoints.is_dir() else []
            saving = [p for p in checkpoints.glob(".step-*")] if checkpoints.is_dir() else []
            if done and saving:
                killed = rank_pid(job.pid, 1)
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.002)
        output = job.communicate(timeout=180)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert killed is not None, "never saw a save in progress"
    assert job.returncode != 0, output[-2000:]
    latest = read_state_dir(tmp_path / "run")
    step = int(latest.name.split("-")[1])
    assert (latest / "state.json").is_file() and step >= 1
    converted = isthmus("convert", str(tmp_path / "run"), "--to", "isthmus", "--output", str(tmp_path / "whole"))
    assert converted.returncode == 0, converted.stderr
    assert load_checkpoint(tmp_path / "whole").state.step == step
    resumed = subprocess.run(torchrun(2, *DECODER, *wide, f"train.steps={step + 1}", f"output_dir={tmp_path / 'run'}",
                                      "--no-progress", "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The process of ``rank`` among the launcher's descendants (read from its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if parent != launcher and not is_descendant(parent, launcher):
                continue
            return int(entry.name)
    return None


def is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


MINDSPORE_RANK = """
import json, sys
from pathlib import Path
from isthmus.registry.manager import load_plugins
from isthmus.train import parallel
from isthmus.train.run import compose_run, prepare
from isthmus.train.trainer import Trainer

registry = load_plugins(autoload=False)[1]
cfg = compose_run(registry, sys.argv[2:])
run = prepare(cfg, registry)
comm = parallel.start(cfg, run.backend)
trainer = Trainer(run, Path(cfg.output_dir), comm=comm)
trainer.fit()
held = {n: int(m.shape[0]) for n, m in trainer.optimizer.exp_avg.items()}
Path(sys.argv[1], f"rank{comm.rank}.json").write_text(json.dumps(held))
"""


@pytest.mark.slow
def test_mindspore_two_ranks_shard_the_optimizer_state_under_msrun_and_match_one_process(tmp_path):
    msrun = Path(sys.executable).parent / "msrun"
    assert msrun.exists(), f"{msrun} is missing: the mindspore wheel installs it (make venv)"
    args = [*DECODER, "backend.engine=mindspore", "train.steps=4"]
    single = isthmus("train", *args, f"output_dir={tmp_path / 'one'}", "--no-progress")
    assert single.returncode == 0, single.stderr
    script = tmp_path / "rank.py"
    script.write_text(MINDSPORE_RANK)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "GLOG_v": "3"}
    two = subprocess.run([str(msrun), "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()),
                          "--log_dir", str(tmp_path / "logs"), "--join", "True", str(script), str(tmp_path), *args,
                          "distributed=fsdp", f"output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one_ckpt, two_ckpt = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    worst, close, total = weights_agree(one_ckpt.params, two_ckpt.params)
    assert worst < 1e-4 and close >= 0.999 * total
    for name, moment in one_ckpt.optimizer_tensors.items():  # gathered whole into the checkpoint
        assert np.max(np.abs(two_ckpt.optimizer_tensors[name] - moment)) < 1e-5, name
    for rank in (0, 1):  # each rank held the moments of half of every parameter
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, spec_shape in ((n, a.shape) for n, a in one_ckpt.params.items()):
            assert held[name] == -(-int(np.prod(spec_shape)) // 2), name
