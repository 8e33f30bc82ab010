"""Test plugins for dump, compare and portability, loaded by name (``ISTHMUS_PLUGINS=dump_plugins``
with ``tests`` on ``PYTHONPATH``) so the dump subprocesses see them too.

* ``relu-classifier`` on ``blobs``: a real engine-neutral model with ReLU kinks and a 2x2 max-pool
  (conv, ReLU, max-pool, linear, ReLU, linear), trained on labelled 8x8 images whose class is the
  bright quadrant.
* Backends on the real torch CPU engine, each with one kernel deliberately wrong through a kernel
  route: ``linear-off`` and ``gelu-off`` (0.1% too large, forward and so backward), ``relu-grad-off`` (a
  correct ReLU forward whose backward lets the gradient through negative inputs), ``linear-fp16``
  (linear computed in float16 whatever the run's dtype, cast back), ``linear-tf32`` (linear's
  operands rounded to TF32's 10-bit mantissa, as a silent TF32 or HF32 matmul does), ``crashes`` (its
  factory raises) and ``hangs`` (its factory never returns).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.config.schema import DataBase, ModelBase, bounds
from isthmus.data.splits import DataSplits
from isthmus.kernels.routing import KernelRoute
from isthmus.nn import layers
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec, Scope, add_specs
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import BackendOptions, BackendSpec, DatasetSpec, ModelSpec, ProbeResult

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS / "data" / "dump_configs"


def plugin_env() -> dict[str, str]:
    """The environment that makes these plugins load in a subprocess."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "ISTHMUS_PLUGINS": "dump_plugins", "PYTHONPATH": path}


def isthmus(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``isthmus ARGS`` in a subprocess that loads these plugins."""
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=plugin_env(), cwd=cwd)


@dataclass
class ClassifierConfig(ModelBase):
    """The test classifier's hyperparameters."""

    name: str = "relu-classifier"
    channels: int = field(default=3, metadata=bounds(ge=1))
    image_size: int = field(default=8, metadata=bounds(ge=2))
    width: int = field(default=8, metadata=bounds(ge=1))
    hidden: int = field(default=16, metadata=bounds(ge=1))
    classes: int = field(default=4, metadata=bounds(ge=2))


@dataclass
class BlobsConfig(DataBase):
    """The test dataset's size and seed."""

    name: str = "blobs"
    num_train: int = field(default=512, metadata=bounds(ge=1))
    num_eval: int = field(default=64, metadata=bounds(ge=1))
    seed: int = 0


def conv_pool(k: Any, scope: Scope, x: Any) -> Any:
    """3x3 convolution, ReLU, 2x2 max-pool."""
    x = k.relu(k.conv2d(x, scope["weight"], scope["bias"], padding=1))
    batch, channels, height, width = k.shape(x)
    x = k.reshape(x, (batch, channels, height // 2, 2, width // 2, 2))
    return k.max(x, axis=(3, 5))


class ReluClassifier(Model):
    """conv -> ReLU -> max-pool -> linear -> ReLU -> linear -> cross-entropy."""

    name = "relu-classifier"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = ClassifierConfig(**{k: v for k, v in config.items()})

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.config
        pooled = c.width * (c.image_size // 2) ** 2
        specs: dict[str, ParamSpec] = {}
        add_specs(specs, "features.conv", {"weight": ParamSpec((c.width, c.channels, 3, 3), "uniform_fan_in"),
                                           "bias": ParamSpec((c.width,), "zeros", decay=False)})
        add_specs(specs, "head.fc1", layers.linear_specs(pooled, c.hidden, std=0.2))
        add_specs(specs, "head.fc2", layers.linear_specs(c.hidden, c.classes, std=0.2))
        return specs

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Any:
        features = Scope(params, "features")
        images = k.cast(batch["images"], k.dtype(features["conv.weight"]))
        x = conv_pool(k, features.sub("conv"), images)
        x = k.reshape(x, (k.shape(x)[0], -1))
        head = Scope(params, "head")
        x = k.relu(layers.linear(k, head.sub("fc1"), x))
        return layers.linear(k, head.sub("fc2"), x)

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = True
             ) -> tuple[Any, dict[str, Any]]:
        return k.cross_entropy(self.forward(k, params, batch, training), batch["labels"]), {}


class Blobs:
    """Labelled images: class ``c`` brightens quadrant ``c`` of an 8x8 noise image."""

    def __init__(self, count: int, seed: int, size: int = 8) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 4, size=count).astype(np.int64)
        self.images = rng.normal(0.0, 1.0, size=(count, 3, size, size)).astype(np.float32)
        half = size // 2
        for i, label in enumerate(self.labels):
            row, col = divmod(int(label), 2)
            self.images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 0.5

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def tokens_per_sample(self) -> int:
        return 1

    def batch(self, indices: Any) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {"images": self.images[indices], "labels": self.labels[indices]}

    def iter_batches(self, batch_size: int, seed: int = 0) -> Any:
        from isthmus.data.batches import BatchIterator

        return BatchIterator(self, batch_size, seed=seed)

    def resume(self, state: Mapping[str, Any]) -> Any:
        from isthmus.data.batches import BatchIterator

        return BatchIterator.from_state(self, state)


def blobs(config: Mapping[str, Any], saved: Any = None) -> DataSplits:
    seed = int(config.get("seed", 0))
    return DataSplits(Blobs(int(config["num_train"]), seed), Blobs(int(config["num_eval"]), seed + 1),
                      classes=("top-left", "top-right", "bottom-left", "bottom-right"))


# ------------------------------------------------------------------------------- backends
def _torch_cpu(request: Any) -> Any:
    from isthmus.plugins.cpu import factory

    return factory(request)


def _crashes(request: Any) -> Any:
    raise RuntimeError("simulated driver crash while opening the device")


def _hangs(request: Any) -> Any:
    time.sleep(3600)
    raise RuntimeError("unreachable")


def _linear_off(x: Any, weight: Any, bias: Any = None) -> Any:
    import torch.nn.functional as F

    return F.linear(x, weight, bias) * 1.001


def _gelu_off(x: Any, approximate: str = "none") -> Any:
    import torch.nn.functional as F

    return F.gelu(x, approximate=approximate) * 1.001


def _linear_fp16(x: Any, weight: Any, bias: Any = None) -> Any:
    import torch.nn.functional as F

    out = F.linear(x.half(), weight.half(), None if bias is None else bias.half())
    return out.to(x.dtype)


def _tf32(value: Any) -> Any:
    """``value`` (float32) rounded to 10 mantissa bits, the gradient passed straight through."""
    import torch

    dropped = 23 - 10
    bits = value.detach().float().contiguous().view(torch.int32)
    rounded = ((bits + (1 << (dropped - 1))) & ~((1 << dropped) - 1)).view(torch.float32).to(value.dtype)
    return value + (rounded - value).detach()


def _linear_tf32(x: Any, weight: Any, bias: Any = None) -> Any:
    import torch.nn.functional as F

    return F.linear(_tf32(x), _tf32(weight), bias)


def _relu_grad_off(x: Any) -> Any:
    import torch

    class StraightThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, value: Any) -> Any:
            return torch.relu(value)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad  # wrong: a ReLU passes no gradient where its input was negative

    return StraightThrough.apply(x)


def _backend(name: str, factory: Any, description: str) -> BackendSpec:
    return BackendSpec(name=name, engines=("torch",), default_engine="torch", priority=0,
                       probe=lambda: ProbeResult(True, "test backend"), factory=factory,
                       engine_modules={"torch": ("torch",)}, auto=False, description=description,
                       options=BackendOptions())


@hookimpl
def register_backends(register: Any) -> None:
    register(_backend("linear-off", _torch_cpu, "torch CPU with linear 0.1% too large"))
    register(_backend("gelu-off", _torch_cpu, "torch CPU with gelu 0.1% too large"))
    register(_backend("relu-grad-off", _torch_cpu, "torch CPU with a ReLU backward that ignores the kink"))
    register(_backend("linear-fp16", _torch_cpu, "torch CPU computing linear in float16"))
    register(_backend("linear-tf32", _torch_cpu, "torch CPU rounding linear's operands to TF32"))
    register(_backend("crashes", _crashes, "a backend whose device never opens"))
    register(_backend("hangs", _hangs, "a backend that never starts"))


@hookimpl
def register_kernels(register: Any) -> None:
    register(KernelRoute(backend="linear-off", op="linear", impl=_linear_off))
    register(KernelRoute(backend="gelu-off", op="gelu", impl=_gelu_off))
    register(KernelRoute(backend="relu-grad-off", op="relu", impl=_relu_grad_off))
    register(KernelRoute(backend="linear-fp16", op="linear", impl=_linear_fp16))
    register(KernelRoute(backend="linear-tf32", op="linear", impl=_linear_tf32))


@hookimpl
def register_models(register: Any) -> None:
    register(ModelSpec(name="relu-classifier", factory=lambda config, data: ReluClassifier(config),
                       schema=ClassifierConfig))


@hookimpl
def register_datasets(register: Any) -> None:
    register(DatasetSpec(name="blobs", factory=blobs, schema=BlobsConfig))


@hookimpl
def register_config_dirs() -> Path:
    return CONFIGS
