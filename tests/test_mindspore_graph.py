"""The MindSpore engine in graph mode (``backend.options.mode=graph``, the default): the compiled
train step keeps PyNative's semantics (losses, dropout stream, fp16 loss scale and skip policy,
checkpoints that cross to torch and back), and a model that cannot compile is named in one line.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest

if importlib.util.find_spec("mindspore") is None:
    pytest.skip("MindSpore is not installed (pip install 'isthmus[mindspore]')", allow_module_level=True)
pytest.importorskip("torch")

import isthmus.backends.mindspore.engine  # noqa: E402,F401  (quiets MindSpore before it loads)

from isthmus.backends.cpu.options import parse_options  # noqa: E402
from isthmus.backends.mindspore.graph import GraphBreak  # noqa: E402
from isthmus.config.composer import ConfigError  # noqa: E402
from isthmus.models.captioner.model import TinyCaptioner  # noqa: E402
from isthmus.registry.hookspecs import hookimpl  # noqa: E402
from isthmus.registry.manager import load_plugins  # noqa: E402
from isthmus.train.checkpoint import load_checkpoint  # noqa: E402
from isthmus.train.run import compose_run, prepare  # noqa: E402
from isthmus.train.trainer import Trainer  # noqa: E402

TINY = [
    "backend=cpu",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers_vision=1",
    "model.n_layers_text=1",
    "model.patch_size=8",
    "data.num_train=96",
    "data.num_eval=16",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.lr=3e-3",
]


def prepared(run_dir, engine: str, *overrides: str, plugins=()):
    manager, registry = load_plugins(autoload=False, extra=[(type(p).__name__, p) for p in plugins])
    cfg = compose_run(registry, [*TINY, f"backend.engine={engine}", f"output_dir={run_dir}", *overrides])
    run = prepare(cfg, registry)
    assert run.backend.engine_name == engine
    return run, manager


def train(run_dir, engine: str, *overrides: str, plugins=(), resume=None, evaluate=True, op_by_op=False):
    """A run through the real trainer; ``evaluate`` False skips the final evaluation (its compile
    costs seconds), ``op_by_op`` switches the engine's whole-step hook off: the trainer's own step."""
    run, manager = prepared(run_dir, engine, *overrides, plugins=plugins)
    trainer = Trainer(run, run_dir, manager, resume=resume)
    if op_by_op:
        trainer.start_state = without_whole_step(trainer)
    if not evaluate:
        trainer.eval_and_log = lambda *args, **kwargs: {}
    return trainer.fit()


def without_whole_step(trainer):
    start = trainer.start_state

    def start_state():
        start()
        trainer.whole_step = None

    return start_state


def rows(run_dir, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


# ---- options ----------------------------------------------------------------------------------------
def test_cpu_options_default_to_graph_and_name_every_bad_key():
    _, registry = load_plugins(autoload=False)
    options = parse_options(dict(compose_run(registry, ["backend=cpu"]).backend.options))
    assert (options.mode, options.jit_level, options.fallback) == ("graph", "O0", False)
    with pytest.raises(ConfigError) as err:
        parse_options({"mode": "eager", "jit_level": "O2", "fallback": "yes", "modes": "graph"})
    text = str(err.value)
    assert "backend.options.mode: 'eager' is not one of graph, pynative" in text
    assert "backend.options.jit_level: 'O2' is not one of O0, O1" in text
    assert "backend.options.fallback: expected true or false, got 'yes'" in text
    assert "backend.options.modes: unknown cpu option (did you mean 'mode'?)" in text


def test_the_mode_reaches_the_engine(tmp_path):
    graph, _ = prepared(tmp_path / "g", "mindspore", "backend.options.jit_level=O1")
    pynative, _ = prepared(tmp_path / "p", "mindspore", "backend.options.mode=pynative")
    assert graph.backend.engine.runtime_info()["mode"].startswith("graph (mindspore.jit trace, jit_level O1)")
    assert pynative.backend.engine.runtime_info()["mode"] == "pynative"
    assert graph.backend.capabilities.compile


# ---- semantics kept ---------------------------------------------------------------------------------
@pytest.mark.slow  # 40 MindSpore steps; the torch -> graph -> torch resume keeps graph training in the fast tier
def test_graph_and_pynative_give_the_same_losses_over_20_steps_with_dropout(tmp_path):
    steps = ["train.steps=20", "train.checkpoint_every=0", "model.dropout=0.1"]
    graph = train(tmp_path / "graph", "mindspore", *steps)
    pynative = train(tmp_path / "pynative", "mindspore", "backend.options.mode=pynative", *steps)
    g, p = rows(tmp_path / "graph"), rows(tmp_path / "pynative")
    gap = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(g, p))
    norm_gap = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(g, p))
    print(f"\ngraph vs pynative, 20 steps with dropout 0.1: loss {g[0]['loss']:.4f} -> {g[-1]['loss']:.4f}, "
          f"max relative loss gap {gap:.1e}, grad norm gap {norm_gap:.1e}")
    assert len(g) == len(p) == 20 and g[-1]["loss"] < 0.9 * g[0]["loss"]
    # The same dropout masks (drawn on the host in the same order) and the same kernels: equal to
    # float32 rounding (seen: 0.0 for the losses, 2e-7 for the norms, which are summed in another order).
    assert gap <= 1e-5 and norm_gap <= 1e-5
    assert graph.evaluation["eval_loss"] == pytest.approx(pynative.evaluation["eval_loss"], rel=1e-5)
    # The dropout stream is the engine's numpy generator in both: the same state after the same steps.
    assert load_checkpoint(tmp_path / "graph").state.rng == load_checkpoint(tmp_path / "pynative").state.rng


class StopAfterCheckpoint(Exception):
    pass


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_checkpoint(self, trainer, step, path):
        if step == self.step:
            raise StopAfterCheckpoint(step)


def test_torch_to_mindspore_graph_to_torch_resume_matches_a_straight_torch_run(tmp_path):
    n = 3
    steps = [f"train.steps={3 * n}", f"train.checkpoint_every={n}", "model.dropout=0.0"]
    straight = tmp_path / "straight"
    train(straight, "torch", *steps, evaluate=False)
    relay = tmp_path / "relay"
    with pytest.raises(StopAfterCheckpoint):
        train(relay, "torch", *steps, plugins=[StopAt(n)], evaluate=False)
    with pytest.raises(StopAfterCheckpoint):
        train(relay, "mindspore", *steps, plugins=[StopAt(2 * n)], resume=relay, evaluate=False)
    assert load_checkpoint(relay).state.engine == "mindspore"
    train(relay, "torch", *steps, resume=relay, evaluate=False)
    resumed, expected = load_checkpoint(relay), load_checkpoint(straight)
    assert resumed.state.step == 3 * n and int(resumed.state.optimizer["step"]) == 3 * n
    worst_param = max(float(np.abs(resumed.params[k] - v).max()) for k, v in expected.params.items())
    worst_moment = max(float(np.abs(resumed.optimizer_tensors[k] - v).max())
                       for k, v in expected.optimizer_tensors.items())
    final, wanted = rows(relay)[-1]["loss"], rows(straight)[-1]["loss"]
    print(f"\ntorch {n} -> mindspore graph {n} -> torch {n} vs torch {3 * n}: params {worst_param:.1e}, "
          f"moments {worst_moment:.1e}, final loss {final:.6f} vs {wanted:.6f}")
    # The tolerances of the two-engine resume test (test_mindspore_engine.py), which explains them.
    assert worst_param <= 1e-4 and worst_moment <= 1e-5
    assert abs(final - wanted) <= 1e-5 * abs(wanted)


class PoisonStep:
    """Turns one batch's images into infinities once the trainer has set up its data."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_start(self, trainer):
        batches, poisoned = trainer.data, self.step

        class Poisoned:
            def __init__(self):
                self.count = 0

            def __next__(self):
                batch = dict(next(batches))
                self.count += 1
                if self.count == poisoned:
                    batch["images"] = np.full_like(batch["images"], np.inf)
                return batch

            def state(self):
                return batches.state()

        trainer.data = Poisoned()


def test_fp16_keeps_its_loss_scale_in_the_graph_and_skips_a_poisoned_step(tmp_path):
    steps = ["train.steps=8", "train.checkpoint_every=0", "train.precision=fp16", "model.dropout=0.0"]
    graph = train(tmp_path / "graph", "mindspore", *steps, plugins=[PoisonStep(5)], evaluate=False)
    # The reference: the trainer's own op-by-op step, as the engine ran before graph mode.
    train(tmp_path / "eager", "mindspore", "backend.options.mode=pynative", *steps, plugins=[PoisonStep(5)],
          evaluate=False, op_by_op=True)
    g, e = rows(tmp_path / "graph"), rows(tmp_path / "eager")
    skipped = [row["step"] for row in g if row["skipped"]]
    scales = [row["loss_scale"] for row in g]
    print(f"\nfp16 graph: skipped steps {skipped}, loss scales {scales}")
    # Step 1: the scale 65536 is infinite in float16, so are the gradients it scales. Step 5: the poison.
    assert skipped == [1, 5] and graph.skipped_steps == 2
    assert scales == [32768.0] * 4 + [16384.0] * 4
    # The poisoned loss is NaN (written as null); every other loss is a number.
    assert g[4]["loss"] is None and all(isinstance(row["loss"], float) for row in g if row["step"] != 5)
    # The op-by-op step applies the same policy to the same numbers.
    assert [row["skipped"] for row in e] == [row["skipped"] for row in g]
    assert [row["loss_scale"] for row in e] == scales
    gap = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(g, e) if not a["skipped"])
    assert gap <= 1e-3, gap  # float16 compute: a rounding apart at most (seen: 0.0)
    saved = load_checkpoint(tmp_path / "graph")
    assert int(saved.state.optimizer["step"]) == 8 - 2 and saved.state.optimizer["loss_scale"]["scale"] == 16384.0


# ---- what cannot compile ----------------------------------------------------------------------------
class BranchingCaptioner(TinyCaptioner):
    """The captioner with a Python branch on a tensor's value in its loss."""

    def loss(self, k, params, batch, training=True):
        loss, metrics = super().loss(k, params, batch, training)
        if k.greater(loss, 100.0):  # data-dependent: which way it goes depends on the numbers
            loss = k.mul(loss, 0.5)
        return loss, metrics


def branching_run(run_dir, *overrides: str):
    run, manager = prepared(run_dir, "mindspore", "train.steps=3", "train.checkpoint_every=0", *overrides)
    run.model.__class__ = BranchingCaptioner  # the same model, tokenizer and all, with the branch
    return run, manager


def test_a_branch_on_tensor_values_is_named_in_one_line_at_the_first_step(tmp_path):
    run, manager = branching_run(tmp_path)
    trainer = Trainer(run, tmp_path, manager)
    with pytest.raises(GraphBreak) as err:
        trainer.fit()
    message = str(err.value)
    print("\n" + message)
    assert "\n" not in message and trainer.step == 1
    assert message.startswith("model tiny-captioner cannot run as a MindSpore graph: tests/test_mindspore_graph.py:")
    assert "in loss() reads a tensor's value (bool(tensor): a Python branch on a tensor's value)" in message
    assert "backend.options.mode=pynative" in message and "backend.options.fallback=true" in message


def test_with_fallback_allowed_the_model_trains_in_pynative(tmp_path, caplog):
    run, manager = branching_run(tmp_path, "backend.options.fallback=true")
    with caplog.at_level(logging.WARNING, logger="isthmus.mindspore"):
        result = Trainer(run, tmp_path, manager).fit()
    assert result.steps == 3 and result.skipped_steps == 0
    warnings = [r.getMessage() for r in caplog.records if "cannot run as a MindSpore graph" in r.getMessage()]
    assert len(warnings) == 1 and "running it in PyNative" in warnings[0]
    assert run.backend.engine.runtime_info()["mode"].startswith("pynative after a graph fallback")
