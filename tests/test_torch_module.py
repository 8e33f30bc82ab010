"""``model=torch-module``: any ``nn.Module`` trained by the isthmus trainer on the torch engine:
losses fall, checkpoints carry the module's own names and resume bit for bit (dropout included),
bf16 runs through torch autocast, the torch exporter is chosen and matches in ONNX Runtime, and
every mistake (a factory that does not import, a forward that raises, a batch key the module does
not take, another engine) is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.manager import load_plugins
from isthmus.train.checkpoint import load_checkpoint
from isthmus.train.run import CapabilityError, compose_run, prepare
from isthmus.train.trainer import Trainer

MODULE = textwrap.dedent('''
    import torch.nn as nn


    class Net(nn.Module):
        """A hand-written CNN with dropout, taking the batch's images as ``images``."""

        def __init__(self, classes=3, width=8, dropout=0.25):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(2 * width, classes)

        def forward(self, images):
            return self.head(self.drop(self.features(images)))


    def build(**kwargs):
        return Net(**kwargs)


    def broken(**kwargs):
        class Broken(nn.Module):
            def forward(self, images):
                raise RuntimeError("this layer is not finished")
        return Broken()
''')
COMMON = ["model=torch-module", "model.loss=cross_entropy", "data=example-shapes", "data.num_train=64",
          "data.num_eval=16", "backend=cpu", "train.batch_size=8", "train.warmup_steps=1", "train.lr=1e-2",
          "train.eval_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("modules")
    (folder / "handnet.py").write_text(MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def run_of(tmp_path: Path, *overrides: str, plugins=()):
    manager, registry = load_plugins(extra=[(type(p).__name__, p) for p in plugins])
    cfg = compose_run(registry, [*COMMON, "model.factory=handnet:build", f"output_dir={tmp_path}", *overrides])
    return prepare(cfg, registry), manager


def test_trains_with_the_modules_own_names_and_initialisation(module_dir, tmp_path):
    run, manager = run_of(tmp_path, "train.steps=12", "train.checkpoint_every=0")
    assert list(run.model.param_specs()) == [name for name, _ in run.model.module.named_parameters()]
    result = Trainer(run, tmp_path, manager).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["split"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    saved = load_checkpoint(tmp_path).params
    assert set(saved) == {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
                          "head.weight", "head.bias"}
    assert np.isfinite(result.evaluation["eval_loss"])
    # The start is the module's own initialisation under the run's seed, not isthmus's.
    import handnet
    import torch

    torch.manual_seed(0)
    own = handnet.build()
    first = run.model.initial_parameters(0)
    assert all(np.array_equal(first[n], p.detach().numpy()) for n, p in own.named_parameters())


class StopAfter:
    class Stop(Exception):
        pass

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_checkpoint(self, trainer, step, path):
        if step == self.step:
            raise self.Stop()


def test_resume_is_bitwise_equal_to_an_uninterrupted_run_with_dropout(module_dir, tmp_path):
    straight, manager = run_of(tmp_path / "a", "train.steps=6", "train.checkpoint_every=3")
    Trainer(straight, tmp_path / "a", manager).fit()
    stopped, manager = run_of(tmp_path / "b", "train.steps=6", "train.checkpoint_every=3", plugins=(StopAfter(3),))
    with pytest.raises(StopAfter.Stop):
        Trainer(stopped, tmp_path / "b", manager).fit()
    resumed, manager = run_of(tmp_path / "b", "train.steps=6", "train.checkpoint_every=3")
    Trainer(resumed, tmp_path / "b", manager, resume=tmp_path / "b").fit()
    a, b = load_checkpoint(tmp_path / "a").params, load_checkpoint(tmp_path / "b").params
    assert all(np.array_equal(a[n], b[n]) for n in a)
    # Dropout draws matter: without the default generator's state the resumed weights would differ.
    reseeded, manager = run_of(tmp_path / "c", "train.steps=6", "train.checkpoint_every=3", "seed=1")
    Trainer(reseeded, tmp_path / "c", manager).fit()
    c = load_checkpoint(tmp_path / "c").params
    assert not all(np.array_equal(a[n], c[n]) for n in a)


def test_bf16_runs_the_module_under_torch_autocast(module_dir, tmp_path):
    run, manager = run_of(tmp_path, "train.steps=2", "train.checkpoint_every=0", "train.precision=bf16")
    seen = []
    run.model.module.features[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    Trainer(run, tmp_path, manager).fit()
    import torch

    assert torch.bfloat16 in seen  # the convolution ran in bf16
    assert all(p.dtype.name == "float32" for p in load_checkpoint(tmp_path).params.values())  # float32 masters


def test_another_engine_is_refused_in_one_line(module_dir, tmp_path):
    with pytest.raises(CapabilityError, match="runs on the torch engine only.*backend.engine=torch"):
        run_of(tmp_path, "backend.engine=mindspore")


def isthmus(*args: str, env_path: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "PYTHONPATH": str(env_path)}
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("overrides, expected", [
    (["model.factory=nosuch.module:build"], "model.factory=nosuch.module:build: cannot import nosuch.module"),
    (["model.factory=handnet:missing"], "handnet has no callable 'missing'"),
    (["model.factory=handnet:broken"], "the module's forward raised RuntimeError: this layer is not finished"),
    (["model.inputs={pixel_values: images}"], "the module's forward takes no argument 'pixel_values' (it takes images)"),
    (["model.inputs={images: pictures}"], "the batch has no 'pictures'"),
])
def test_mistakes_are_one_line_errors(module_dir, tmp_path, overrides, expected):
    from isthmus.models.nn_module.model import ModuleError

    with pytest.raises(ModuleError) as caught:
        run, manager = run_of(tmp_path, "train.steps=1", "train.checkpoint_every=0", *overrides)
        Trainer(run, tmp_path, manager).fit()
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_mistake_reaches_the_command_line_as_one_line(module_dir, tmp_path):
    result = isthmus("train", *COMMON, "model.factory=handnet:broken", "train.steps=1", f"output_dir={tmp_path}",
                     "--no-progress", env_path=module_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "this layer is not finished" in lines[0]


@pytest.mark.slow
def test_export_takes_the_torch_exporter_and_matches_in_onnx_runtime(module_dir, tmp_path):
    trained = isthmus("train", *COMMON, "model.factory=handnet:build", "train.steps=3", f"output_dir={tmp_path}",
                      "--no-progress", env_path=module_dir)
    assert trained.returncode == 0, trained.stderr
    exported = isthmus("export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "net.onnx"),
                       env_path=module_dir)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "with the torch exporter" in exported.stdout and "logits, batch 1" in exported.stdout
    refused = isthmus("export", "--checkpoint", str(tmp_path), "--exporter", "kernel", env_path=module_dir)
    assert refused.returncode == 2 and "runs on the torch engine only" in refused.stderr


FUSED = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class TinyRMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
            self.variance_epsilon = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


    class Block(nn.Module):
        """Attention over a short sequence of pixel rows, written with SDPA, between RMSNorms."""

        def __init__(self, dim=12, heads=2, classes=3):
            super().__init__()
            self.embed, self.norm, self.heads = nn.Linear(3 * 8, dim), TinyRMSNorm(dim), heads
            self.qkv, self.out_norm, self.head = nn.Linear(dim, 3 * dim), TinyRMSNorm(dim), nn.Linear(dim, classes)

        def forward(self, images):
            b = images.shape[0]
            x = self.norm(self.embed(F.interpolate(images, size=(8, 8)).permute(0, 2, 1, 3).reshape(b, 8, 24)))
            q, k, v = (t.reshape(b, 8, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, 8, -1)
            return self.head(self.out_norm(y).mean(1))


    def build():
        return Block()
''')


def test_fused_modules_send_rms_norm_and_sdpa_through_the_kernels_and_keep_the_numbers(module_dir, tmp_path):
    (module_dir / "fusednet.py").write_text(FUSED)
    plain, _ = run_of(tmp_path / "a", "model.factory=fusednet:build")
    fused, _ = run_of(tmp_path / "b", "model.factory=fusednet:build", "model.fused_modules=true")
    assert sorted(fused.model.describe()["fused_modules"]) == ["norm (TinyRMSNorm -> k.rms_norm)",
                                                               "out_norm (TinyRMSNorm -> k.rms_norm)"]
    calls = []
    k = fused.backend.kernels
    rms, attention = k.rms_norm, k.attention
    k.rms_norm = lambda *a, **kw: calls.append("rms_norm") or rms(*a, **kw)
    k.attention = lambda *a, **kw: calls.append("attention") or attention(*a, **kw)
    engine = plain.backend.engine
    weights = plain.model.initial_parameters(0)
    batch = {n: engine.asarray(a) for n, a in plain.data.eval.batch(np.arange(4)).items()}
    with engine.no_grad():
        expected = engine.to_numpy(plain.model.forward(plain.backend.kernels, engine.parameters(weights), batch))
        got = engine.to_numpy(fused.model.forward(k, engine.parameters(weights), batch))
    assert sorted(calls) == ["attention", "rms_norm", "rms_norm"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert fused.model.describe()["fused_attention_calls"] == 1
