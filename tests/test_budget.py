"""Memory estimates from a config (isthmus.train.budget), checked against what they estimate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from isthmus.train import budget


def test_available_memory_is_read_on_linux():
    available, source = budget.available_memory()
    if not sys.platform.startswith("linux"):
        pytest.skip("MemAvailable and cgroups are Linux's")
    assert available is not None and available > 2**20
    assert source == "MemAvailable" or source.startswith("cgroup limit")


def test_a_request_beyond_the_machine_is_refused_in_one_line_with_the_estimate(monkeypatch):
    monkeypatch.delenv(budget.MEMORY_CHECK_ENV, raising=False)
    need = budget.Estimate().add("parameters", 6 * 2**40).add("activations", 2**30)
    with pytest.raises(budget.MemoryBudgetError) as caught:
        budget.check(need, "training m with batch 8", available=8 * 2**30)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("training m with batch 8 needs about 6 TiB of memory (parameters 6 TiB, activations 1 GiB)")
    assert "but 8 GiB is available" in message and "train.memory_check=false or ISTHMUS_MEMORY_CHECK=0" in message
    budget.check(need, "x", setting=False, available=8 * 2**30)  # the config's switch
    monkeypatch.setenv(budget.MEMORY_CHECK_ENV, "0")
    budget.check(need, "x", available=8 * 2**30)  # the environment's
    budget.check(budget.Estimate().add("data", 2**20), "x", available=0)  # too small to matter


def tiny_run():
    from isthmus.registry.manager import get_registry
    from isthmus.train.run import compose, prepare

    from hostile import TINY

    return prepare(compose([*TINY, "train.batch_size=8"]), get_registry())


def test_parameter_estimate_is_what_initialising_allocates():
    from isthmus.nn.params import initialise

    run = tiny_run()
    arrays = initialise(run.model.param_specs(), 0)
    assert budget.param_bytes(run.model.param_specs()) == sum(a.nbytes for a in arrays.values())
    training = budget.model_estimate(run.model, 8, training=True)
    assert training.parts["optimizer state"] == 2 * training.parts["parameters"] == 2 * training.parts["gradients"]


def test_activation_estimate_covers_what_autograd_keeps_for_the_backward_pass():
    """The tensors torch saves for backward during one training step of the captioner, summed by a
    saved-tensor hook, against the model's declared estimate: at least that, and not absurdly more."""
    import torch

    from isthmus.train.evaluate import to_device

    run = tiny_run()
    engine, k = run.backend.engine, run.backend.kernels
    from isthmus.nn.params import initialise

    params = engine.parameters(initialise(run.model.param_specs(), 0))
    batch = to_device(run.backend, next(run.data.train.iter_batches(8, seed=0)))
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.value_and_grad(lambda p: (run.model.loss(k, p, batch, training=True)[0], None), params)
    measured = sum(saved.values())
    declared = run.model.activation_bytes(8, training=True)
    assert measured > 0
    assert measured <= declared <= 20 * measured, (measured, declared)
    assert run.model.activation_bytes(16, training=True) == 2 * declared  # linear in the batch


def test_scene_data_estimate_covers_the_peak_of_building_it():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm")
    from isthmus.data.scene_data import ScenesConfig

    # The peak resident size while building over the resident size just before, from VmHWM and
    # VmRSS: ru_maxrss would count the parent's pages from before exec (Linux keeps that maximum).
    code = ("import json; from isthmus.data.scene_data import scenes\n"
            "def kib(key): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
            "before = kib('VmRSS:')\n"
            "d = scenes({'name': 'scenes', 'num_train': 4000, 'num_eval': 64, 'seed': 0, 'image_size': 48, 'max_shapes': 3})\n"
            "print(json.dumps((kib('VmHWM:') - before) * 1024))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    declared = ScenesConfig(num_train=4000, num_eval=64, seed=0, image_size=48, max_shapes=3).memory_bytes()
    assert 0 < measured <= declared <= 10 * measured, (measured, declared)


def test_human_sizes():
    assert budget.human(512) == "512 B"
    assert budget.human(5.6 * 2**40) == "5.6 TiB"
    assert budget.human(np.float64(3 * 2**30)) == "3 GiB"
