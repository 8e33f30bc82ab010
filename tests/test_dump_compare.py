"""``isthmus dump`` and ``isthmus compare``: bundles made in separate processes (two hosts, simulated),
compared where torch and MindSpore cannot be imported; refusals; faults named by op and layer; bf16
judged by its noise floor; portability's gradient check on a ReLU and max-pool model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dump_plugins import TESTS, isthmus, plugin_env

TINY = [
    "backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1",
    "train.steps=4", "train.eval_every=0", "train.checkpoint_every=2", "train.keep_last=3",
]
RELU = ["model=relu-classifier", "data=blobs", "backend=cpu", "train.steps=60", "train.batch_size=32",
        "train.lr=1e-2", "train.warmup_steps=5", "train.eval_every=0", "train.checkpoint_every=0"]
# Run in a process where torch, torch_npu and MindSpore cannot be imported: any attempt fails it.
NO_ENGINES = """
import sys
class NoEngines:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torch_npu", "mindspore"):
            raise ImportError(f"{name} may not be imported by isthmus compare")
sys.meta_path.insert(0, NoEngines())
from isthmus.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def no_engine_compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_ENGINES, "compare", *args], capture_output=True, text=True,
                          timeout=600, env=plugin_env(), cwd=cwd)


@pytest.fixture(scope="module")
def registry():
    """The built-in and installed plugins (the example model package among them) and the test
    plugins, in this process."""
    import dump_plugins
    from isthmus.registry.manager import load_plugins

    return load_plugins(extra=[("dump_plugins", dump_plugins)])[1]


def dump_here(registry, checkpoint: Path, out: Path, *overrides: str, **options) -> Path:
    """``isthmus dump`` in this process (where running apart is not what a test is about)."""
    from isthmus.verify.dump import DumpOptions, dump

    return dump(registry, checkpoint, list(overrides), out, DumpOptions(**options), echo=lambda line: None).path


def cli_here(registry, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The ``isthmus`` command line in this process, with ``registry``: (exit code, stdout, stderr)."""
    import isthmus.cli.main as cli

    monkeypatch.setattr(cli, "registry", lambda: registry)
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Path:
    """A tiny captioner with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("captioner")
    result = isthmus("train", *TINY, f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory) -> Path:
    """The ReLU and max-pool classifier, trained to a loss near 0.15."""
    run_dir = tmp_path_factory.mktemp("relu")
    result = isthmus("train", *RELU, f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def relu_portability(relu_run, tmp_path_factory):
    """``isthmus portability`` on the ReLU classifier: a correct backend, one with linear 0.1% off,
    one with linear's operands rounded to TF32, one with a wrong ReLU backward."""
    out = tmp_path_factory.mktemp("relu-report")
    result = isthmus("portability", "--checkpoint", str(relu_run), "--backends",
                     "cpu,linear-off,linear-tf32,relu-grad-off,reference", "--out", str(out))
    return result, out, json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------ two hosts
def test_two_hosts_dump_apart_and_compare_where_no_engine_imports(captioner, tmp_path):
    torch_host, mindspore_host, fresh = tmp_path / "host-a", tmp_path / "host-b", tmp_path / "fresh"
    a = isthmus("dump", "--checkpoint", str(captioner), "--out", str(torch_host / "cpu"), "backend=cpu")
    assert a.returncode == 0, a.stderr
    b = isthmus("dump", "--checkpoint", str(captioner), "--out", str(mindspore_host / "ms"), "backend=cpu",
                "backend.engine=mindspore")
    assert b.returncode == 0, b.stderr
    fresh.mkdir()
    shutil.copytree(torch_host / "cpu", fresh / "cpu")
    shutil.copytree(mindspore_host / "ms", fresh / "ms")
    shutil.rmtree(torch_host)
    shutil.rmtree(mindspore_host)
    result = no_engine_compare("cpu", "ms", "--out", "report", cwd=fresh)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((fresh / "report" / "report.json").read_text())
    assert report["exit_code"] == 0
    labels = {t["label"]: t for t in report["targets"]}
    assert set(labels) == {"cpu", "cpu:mindspore"}
    for target in labels.values():
        assert target["status"] == "compared" and not target["breach"], target["breach_reasons"]
        assert target["engine"] in ("torch", "mindspore")
        assert len(target["forward"]) >= 20 and {"logits", "loss"} <= {v["name"] for v in target["results"]}
        assert all(v["ratio"] != "inf" and float(v["ratio"]) <= 16 for v in target["forward"])
        assert any("gradients not judged" in note for note in target["notes"])  # no golden bundle given
    for name in ("report.md", "report.html", "error_by_depth.png", "error_vs_magnitude.png"):
        assert (fresh / "report" / name).stat().st_size > 0


def test_bundle_records_identity_environment_and_results(registry, captioner, tmp_path):
    from isthmus.verify.bundle import bundle_size, hash_arrays, read_bundle

    dump_here(registry, captioner, tmp_path / "b", "backend=cpu", train_steps=2, seed=3, batch=3)
    bundle = read_bundle(tmp_path / "b")
    identity, run = bundle.identity, bundle.runs[0]
    batch = {n: bundle.tensors[f"batch/{n}"] for n in identity["batch"]["names"]}
    assert hash_arrays(batch) == identity["batch"]["sha256"] and len(identity["batch"]["indices"]) == 3
    assert identity["checkpoint"]["step"] == 4 and len(identity["checkpoint"]["sha256"]) == 64
    environment = bundle.manifest["environment"]
    assert environment["engine"] == "torch" and "torch" in environment["versions"]
    assert "float32_matmul_precision" in environment["numerics"] and environment["deterministic"] is True
    assert run["dtype"] == "float32" and np.isfinite(run["results"]["loss"])
    assert len(run["results"]["gradients"]) > 10
    assert run["records"]["forward"] and run["records"]["backward"]  # the default level: layers
    assert {r["kind"] for r in run["records"]["forward"]} == {"layer"}
    assert len(run["train"]["losses"]) == 2
    assert bundle_size(tmp_path / "b") < 1_000_000


# --------------------------------------------------------------------------------- refusals
def test_another_checkpoint_other_inputs_and_a_corrupted_bundle_are_refused_in_one_line(
        registry, captioner, tmp_path, monkeypatch, capsys):
    step2 = next(p for p in (captioner / "checkpoints").iterdir() if p.name.endswith("00000002"))
    dump_here(registry, captioner, tmp_path / "a", "backend=cpu", level="model")
    dump_here(registry, step2, tmp_path / "earlier", "backend=cpu", level="model")
    dump_here(registry, captioner, tmp_path / "seed1", "backend=cpu", level="model", seed=1)

    def one_line(*args, words):
        code, _, err = cli_here(registry, monkeypatch, capsys, "compare", *args, "--out", str(tmp_path / "r"))
        assert code == 2, err
        line = err.strip()
        assert "\n" not in line and line.startswith("isthmus: error:") and "Traceback" not in line, line
        for word in words:
            assert word in line, line

    a, earlier, seed1 = (str(tmp_path / n) for n in ("a", "earlier", "seed1"))
    one_line(a, earlier, words=("another checkpoint", "step 2"))
    one_line(a, seed1, words=("different inputs", "--seed 1"))
    data = bytearray((tmp_path / "a" / "tensors.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "a" / "tensors.safetensors").write_bytes(bytes(data))
    one_line(a, words=("corrupted or edited",))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------- the ReLU classifier: faults
@pytest.mark.slow  # three dumps in subprocesses; the two-host test keeps dump + compare in the fast tier
def test_portability_passes_a_correct_backend_on_a_relu_model(relu_portability, tmp_path):
    result, out, report = relu_portability
    cpu = next(t for t in report["targets"] if t["label"] == "cpu")
    assert cpu["status"] == "compared" and not cpu["breach"], cpu["breach_reasons"]
    # The golden gradients' check had to step around ReLU and max-pool kinks, and says so.
    assert report["gradient_check_ok"] is True, report["gradient_check"]
    assert "changes branch" in report["gradient_check"] and "needed a smaller step" in report["gradient_check"]
    # The same bundles without the faulty backends: the command's verdict is a pass.
    again = isthmus("compare", str(out / "bundles" / "cpu"), str(out / "bundles" / "golden-cpu"), "--out",
                    str(tmp_path / "r"))
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_wrong_relu_backward_fails_portability_and_the_backward_replay_names_relu(relu_portability):
    result, out, report = relu_portability
    assert result.returncode == 1
    target = next(t for t in report["targets"] if t["label"] == "relu-grad-off")
    assert target["breach"]
    culprit = target["first"]["replay_backward"]
    assert culprit["op"] == "relu" and culprit["layer"] == "head" and culprit["path"][-1] == "head/relu:0"
    # The forward is right: no forward record and no op's output disagrees.
    assert "forward" not in target["first"] and target["replay"]["forward_breaches"] == 0
    assert target["first"]["backward"]["direction"] == "backward"
    assert "relu is the first op whose own vector-Jacobian product disagrees" in (out / "report.md").read_text()


def test_a_kernel_off_by_a_thousandth_is_named_by_op_layer_and_path(relu_portability):
    _, out, report = relu_portability
    target = next(t for t in report["targets"] if t["label"] == "linear-off")
    assert target["breach"]
    first = target["first"]["forward"]
    assert first["op"] == "linear" and first["layer"] == "head.fc1" and first["op_record"] == "head.fc1/linear:0"
    assert first["path"] == ["head", "head.fc1", "head.fc1/linear:0"]
    assert target["first"]["replay_forward"]["op"] == "linear"
    page = (out / "report.html").read_text()
    assert "first divergent forward record: head.fc1/linear:0" in page and "path head &gt; head.fc1" in page


def test_a_silent_tf32_linear_in_a_float32_run_is_caught(relu_portability):
    # A TF32 matmul (10-bit operands) is not among the approximations float32's floors admit.
    _, _, report = relu_portability
    target = next(t for t in report["targets"] if t["label"] == "linear-tf32")
    assert target["breach"] and target["dtype"] == "float32"
    first = target["first"]["forward"]
    assert first["op_record"] == "head.fc1/linear:0" and first["ratio"] > 16
    assert max(v["ratio"] for v in target["forward"] + target["backward"]) > 100 * 16
    assert target["first"]["replay_forward"]["op"] == "linear"
    # Every backward record comes after cross entropy's backward, so all carry its allowance.
    from isthmus.verify.metrics import approximation_allowance

    allowance = approximation_allowance("float32")
    assert all(v["floor"] >= allowance for v in target["backward"])
    assert next(v for v in target["forward"] if v["op"] == "cross_entropy")["floor"] >= allowance


def test_bfloat16_is_judged_by_its_noise_floor_and_a_float16_kernel_is_caught(registry, relu_run, relu_portability,
                                                                               tmp_path):
    from isthmus.verify.compare import compare
    from isthmus.verify.report import write_report

    _, out, _ = relu_portability
    honest = dump_here(registry, relu_run, tmp_path / "bf16", "backend=cpu", "train.precision=bf16", level="op")
    claims = dump_here(registry, relu_run, tmp_path / "fp16", "backend.name=linear-fp16", "train.precision=bf16",
                       level="op")
    comparison = compare([honest, claims, out / "bundles" / "golden-cpu"], registry=registry, echo=lambda line: None)
    write_report(comparison, tmp_path / "report")
    assert comparison.exit_code == 1
    by_label = {t.label: t for t in comparison.targets}
    honest, claims = by_label["cpu"], by_label["linear-fp16"]
    assert honest.dtype == claims.dtype == "bfloat16"
    assert not honest.breach, honest.breach_reasons
    # A fixed float32-style tolerance would fail honest bfloat16: its logits are off by far more than 1e-4.
    logits = next(v for v in honest.results if v.name == "logits")
    assert logits.error > 1e-3 and logits.ratio <= 16
    assert claims.breach and any("down-cast" in r for r in claims.breach_reasons)
    assert claims.downcasts[0]["op"] == "linear" and "float16" in claims.downcasts[0]["detail"]
    assert "unrequested down-cast at head.fc1/linear:0" in (tmp_path / "report" / "report.md").read_text()


# ------------------------------------------------------------------ in-process pieces
def _relu_model():
    sys.path.insert(0, str(TESTS))
    import dump_plugins

    model = dump_plugins.ReluClassifier({"name": "relu-classifier"})
    from isthmus.nn.params import initialise

    params = initialise(model.param_specs(), 0)
    data = dump_plugins.blobs({"num_train": 8, "num_eval": 8, "seed": 0})
    return model, params, data.eval.batch(np.arange(8))


def test_layer_names_come_from_the_scopes_on_the_stack():
    from isthmus.verify.conformance import reference_backend
    from isthmus.verify.truth import trace

    model, params, batch = _relu_model()
    kernels, engine = reference_backend()
    run = trace(kernels, model, engine.parameters(params), {n: engine.asarray(a) for n, a in batch.items()})
    names = [c.name for c in run.calls]
    assert names[:5] == ["features/cast:0", "features.conv/conv2d:0", "features.conv/relu:0",
                         "features.conv/reshape:0", "features.conv/max:0"]
    # Two scopes live in forward(): the relu after fc1 belongs to the one bound last, head.
    assert "head/relu:0" in names and names[-1] == "cross_entropy:0"
    layers = {layer.name: layer.last.name for layer in run.layers}
    assert layers["features.conv"] == "features.conv/max:0" and layers["head.fc2"] == "head.fc2/linear:0"


def test_each_call_is_placed_at_the_line_that_made_it(registry, captioner):
    """A call's ``line`` (worked out from its frame's instruction offset after the call) is the line
    the model code was at when it made the call, for every call of a captioner pass."""
    from isthmus.verify.recording import Recording

    class Lines:
        wants_call = None  # every call

        def __init__(self) -> None:
            self.checked = 0

        def call(self, info, args, kwargs, out) -> None:
            model_frame = sys._getframe(2)  # this method, the recording's wrapper, the model code
            assert (info.code, info.line) == (model_frame.f_code, model_frame.f_lineno), info.name
            self.checked += 1

        def layer(self, info, out) -> None:
            pass

    restored, backend, batch = captioner_on_cpu(registry, captioner)
    engine, sink = backend.engine, Lines()
    recording = Recording(backend.kernels, sink)
    restored.model.loss(recording.kernels, engine.parameters(restored.params),
                        {n: engine.asarray(a) for n, a in batch.items()}, training=False)
    recording.end()
    assert sink.checked == recording.index > 50


def test_where_names_the_calling_code_also_when_code_objects_come_and_go(monkeypatch):
    """``CallInfo.where`` is cached by code object; code made at run time and dropped (whose id a
    later code object may take once the cache has let it go) never lends its name to another."""
    from isthmus.verify import recording
    from isthmus.verify.recording import CallInfo

    monkeypatch.setattr(recording, "_CACHE_LIMIT", 2)
    seen = []
    for i in range(50):
        module = compile(f"def made_{i}():\n    return {i}\n", f"made_{i}.py", "exec")
        code = next(c for c in module.co_consts if hasattr(c, "co_name"))  # no function: no cycle to collect
        seen.append(id(code))
        assert CallInfo(0, "add", "add:0", "", (), code, 2).where == f"made_{i} (made_{i}.py:2)"
        del module, code
    assert len(set(seen)) < len(seen)  # ids were reused, so the check above had something to catch


def test_a_recording_is_reused_once_its_run_ends_and_lets_its_kernel_set_go():
    """The next run on the same kernel set takes the ended recording (its wrapped ops) and names
    every call as a new one would; a recording still running is never handed out, one ended runs
    again for its own sink, and an ended one does not keep its kernel set alive."""
    import gc
    import weakref

    from isthmus.verify.conformance import reference_backend
    from isthmus.verify.recording import Recording

    model, params, batch = _relu_model()
    kernels, engine = reference_backend()
    params64, batch64 = engine.parameters(params), {n: engine.asarray(a) for n, a in batch.items()}

    class Names:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.layers: list[tuple[str, str]] = []

        def call(self, info, args, kwargs, out) -> None:
            self.calls.append(info.name)

        def layer(self, info, out) -> None:
            self.layers.append((info.name, info.last.name))

    def run(recording: Recording) -> None:
        recording.begin()
        model.loss(recording.kernels, params64, batch64, training=False)
        recording.end()

    first_sink = Names()
    first = Recording.for_kernels(kernels, first_sink)
    running = Recording.for_kernels(kernels, Names())
    assert running is not first  # the first has not ended
    run(first)
    again_sink = Names()
    again = Recording.for_kernels(kernels, again_sink)
    assert again is first and first.sink is again_sink
    run(again)
    assert again_sink.calls == first_sink.calls and again_sink.layers == first_sink.layers
    # An engine may run the function it differentiates twice: begin() on the ended recording runs
    # it again for the same sink, and it is not handed out meanwhile.
    again_sink.calls.clear()
    again.begin()
    assert Recording.for_kernels(kernels, Names()) is not again
    model.loss(again.kernels, params64, batch64, training=False)
    again.end()
    assert again_sink.calls == first_sink.calls
    model.loss(again.kernels, params64, batch64, training=False)  # after the end: runs, unrecorded
    assert again_sink.calls == first_sink.calls
    assert first_sink.calls[0] == "features/cast:0" and len(first_sink.calls) == 10 and first_sink.layers
    held = weakref.ref(kernels)
    del kernels, first, again, running
    gc.collect()
    assert held() is None


def test_gradient_check_steps_around_kinks_where_a_fixed_step_fails():
    from isthmus.verify.conformance import reference_backend
    from isthmus.verify.truth import gradient_check, trace

    model, params, batch = _relu_model()
    kernels, engine = reference_backend()
    params64, batch64 = engine.parameters(params), {n: engine.asarray(a) for n, a in batch.items()}
    import torch

    weights = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in params.items()}
    from isthmus.registry.manager import get_registry
    from isthmus.train.restore import build_label

    cpu = build_label(get_registry(), "cpu")
    cpu_batch = {n: cpu.engine.asarray(a, "float64" if a.dtype.kind == "f" else None) for n, a in batch.items()}
    _, _, grads = cpu.engine.value_and_grad(lambda p: (model.loss(cpu.kernels, p, cpu_batch)[0], None), weights)
    golden = {n: g.detach().numpy() for n, g in grads.items()}
    check = gradient_check(kernels, model, params64, batch64, golden)
    assert check.ok, check.line()
    # A fixed step of 1e-3 crosses kinks on this model: the old check disagreed beyond its tolerance.
    rng, worst = np.random.default_rng(0), 0.0
    for name, value in params64.items():
        direction = rng.standard_normal(value.shape)
        direction /= np.linalg.norm(direction)
        h = 1e-3 * max(1.0, float(np.max(np.abs(value))))
        up, down = dict(params64), dict(params64)
        up[name], down[name] = value + h * direction, value - h * direction
        numeric = (trace(kernels, model, up, batch64).loss - trace(kernels, model, down, batch64).loss) / (2 * h)
        analytic = float(np.sum(golden[name] * direction))
        largest = max(np.abs(g).max() for g in golden.values())
        worst = max(worst, abs(numeric - analytic) / max(abs(analytic), 1e-3 * largest))
    assert worst > 1e-6, worst
    assert any(h < 1e-3 for h in check.steps.values())
    # And a wrong gradient fails it.
    wrong = {**golden, "head.fc1.weight": golden["head.fc1.weight"] * 1.01}
    assert not gradient_check(kernels, model, params64, batch64, wrong).ok


def test_metrics_and_the_noise_floor_verdict():
    from isthmus.verify.metrics import (K, approximation_allowance, approximation_floor, floor_of, running_floors,
                                        tensor_metrics, ulp)

    want = np.array([1.0, -2.0, 0.5, 0.0])
    got = want * (1 + 1e-3)
    metrics = tensor_metrics(got, want, "bfloat16")
    assert metrics["max_abs"] == pytest.approx(2e-3) and metrics["max_rel"] == pytest.approx(1e-3)
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["share_1e-3"] == 0.0 and metrics["share_5e-3"] == 0.0
    assert ulp(np.array([1.0]), "bfloat16")[0] == 2.0**-7 and ulp(np.array([1.0]), "float16")[0] == 2.0**-10
    assert metrics["ulp_max"] == pytest.approx(2e-3 / 2.0**-6)  # at |x| = 2, a bfloat16 step is 2^-6
    assert tensor_metrics(np.array([1.0]), np.array([1.0, 2.0]), "float32")["error"] == float("inf")
    assert floor_of(0.0, "float32") == 2.0**-25 and floor_of(1e-3, "bfloat16") == 2.0**-9
    # A transcendental op lets float32 be off by the kit's per-op tolerance over K (engines
    # approximate exp to tens of units of roundoff); float16's half a unit roundoff is already above
    # the kit's 2e-3 over K, and a linear approximates nothing.
    assert approximation_floor("exp", "float32") == approximation_allowance("float32") == pytest.approx(1e-5 / K)
    assert approximation_floor("exp", "float16") == 0.0 and approximation_floor("linear", "float32") == 0.0
    # A record gets it when an approximated op feeds it: forward, at or before its call (a layer
    # record is named by its last call); backward, at or after it. Calls 3 and 5 approximate here.
    from types import SimpleNamespace

    from isthmus.verify.compare import Reference

    truth = SimpleNamespace(names={"stem": (1, 0), "block": (4, 0), "head": (6, 0)}, approximated=(3, 5))
    forward = {name: Reference.approximation(truth, {"name": name}, "float32") for name in truth.names}
    backward = {name: Reference.approximation(truth, {"name": name}, "float32", backward=True) for name in truth.names}
    allowance = approximation_allowance("float32")
    assert forward == {"stem": 0.0, "block": allowance, "head": allowance}
    assert backward == {"stem": allowance, "block": allowance, "head": 0.0}
    assert Reference.approximation(SimpleNamespace(names={"a": (1, 0)}, approximated=None), {"name": "a"}, "float32") == 0
    assert running_floors([1e-7, 5e-8, 3e-7, 1e-7]) == [1e-7, 1e-7, 3e-7, 3e-7]
    assert K >= 1


@pytest.fixture(params=["native", "numpy"])
def statistics_kernel(request, monkeypatch, tmp_path):
    """Each statistics test runs on the one-pass C kernel (built into a fresh cache) and on numpy alone."""
    from isthmus.verify import native

    monkeypatch.setenv("ISTHMUS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ISTHMUS_NATIVE_STATS", "1" if request.param == "native" else "0")
    native.reset()
    how = native.how()
    assert how.startswith("native" if request.param == "native" else "numpy"), how
    yield request.param
    native.reset()


def test_statistics_of_large_and_non_finite_records(statistics_kernel):
    from isthmus.verify.statistics import CHUNK, DOT_CHUNK, STATS, stats

    rng = np.random.default_rng(0)
    # Sizes around and beyond the chunk of the single-threaded dot product and the piece read at a
    # time, one with a large mean (the centred variance) and one with a NaN and an Inf (the slow path).
    for size, offset, dtype in ((DOT_CHUNK - 1, 0.0, np.float32), (DOT_CHUNK + 1, 0.0, np.float32),
                                (5 * DOT_CHUNK + 17, 1e4, np.float32), (3 * CHUNK + 5, 0.5, np.float32),
                                (CHUNK + 1, -2.0, np.float16)):
        values = (rng.standard_normal(size) + offset).astype(dtype)
        row = dict(zip(STATS, stats(values)))
        wide = values.astype(np.float64)
        assert row["count"] == size and row["min"] == wide.min() and row["max"] == wide.max()
        assert row["mean"] == pytest.approx(wide.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(wide.std(), rel=1e-9)
        assert row["l2"] == pytest.approx(float(np.sqrt(np.sum(wide * wide))), rel=1e-12)
    for size, dtype in ((3 * DOT_CHUNK, np.float64), (CHUNK + 3 * DOT_CHUNK, np.float32)):
        values = rng.standard_normal(size).astype(dtype)
        values[5], values[size - 3] = np.nan, np.inf
        row = dict(zip(STATS, stats(values)))
        good = values[np.isfinite(values)].astype(np.float64)
        assert row["nan"] == 1 and row["inf"] == 1 and row["count"] == good.size
        assert row["l2"] == pytest.approx(float(np.sqrt(np.sum(good * good))), rel=1e-12)


def test_statistics_of_many_records_at_once_equal_each_read_alone(statistics_kernel):
    """``stats_of`` (what a dump's deferred read calls) gives every record the row ``stats`` gives
    it, across dtypes, layouts and the records that leave the fast path; the C kernel agrees with
    numpy to float64 rounding."""
    from isthmus.verify.statistics import STATS, _numpy_stats, stats, stats_of

    rng = np.random.default_rng(3)
    records = [rng.standard_normal((4, 31, 64)).astype(np.float32),
               rng.standard_normal((8, 9)).astype(np.float32).T,  # not contiguous
               rng.standard_normal(5000) * 1e-3 + 7.0,  # float64, a large mean: the centred variance
               np.full(37, 2.5, np.float32),  # constant: no variance at all
               np.array([1.0, np.nan, -np.inf, 4.0], np.float32),
               np.zeros(0, np.float32), np.arange(12, dtype=np.int64).reshape(3, 4),
               rng.standard_normal(1000).astype(np.float16), np.array(3.0, np.float32),
               np.array([3e38, 3e38], np.float32),  # finite, with a float32 sum that would overflow
               np.array([1e200, -3e200, 2e200])]  # squares beyond float64: the numpy path
    together = stats_of(records)
    assert len(together) == len(records)
    for values, row in zip(records, together):
        alone = stats(values)
        assert np.array_equal(row, alone, equal_nan=True), (values.dtype, values.shape)
        plain = _numpy_stats(np.asarray(values).ravel())
        assert np.allclose(row, plain, rtol=1e-13, atol=0, equal_nan=True), (dict(zip(STATS, row)), dict(zip(STATS, plain)))
    assert together[4][STATS.index("nan")] == 1 and together[4][STATS.index("inf")] == 1
    assert together[3][STATS.index("std")] == 0.0


def test_the_statistics_kernel_falls_back_to_numpy_with_the_reason(monkeypatch, tmp_path):
    """No compiler, a compiler that fails, a cache that cannot be written, or the switch turned off:
    numpy computes the rows, and :func:`native.how` (recorded in every bundle) says why; nothing is
    left in the cache."""
    from isthmus.verify import native
    from isthmus.verify.statistics import stats

    values = np.linspace(-1.0, 2.0, 301, dtype=np.float32)
    expected = stats(values)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ISTHMUS_CACHE_DIR", str(cache))
    for setting, said in ((("CC", "false"), "could not build moments.c"), (("ISTHMUS_NATIVE_STATS", "0"), "=0")):
        monkeypatch.setenv(*setting)
        native.reset()
        try:
            assert native.how().startswith("numpy") and said in native.how(), native.how()
            assert native.rows([(values.ctypes.data, values.size, "float32")], 1e-6) is None
            assert np.allclose(stats(values), expected, rtol=1e-13, atol=0)
        finally:
            monkeypatch.delenv(setting[0])
    assert not cache.exists() or not list(cache.glob("moments-*"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("ISTHMUS_CACHE_DIR", str(blocked / "cache"))  # the cache cannot be made
    native.reset()
    assert native.how().startswith("numpy (the one-pass kernel is unavailable"), native.how()
    assert np.allclose(stats(values), expected, rtol=1e-13, atol=0)
    monkeypatch.setattr(native, "compiler", lambda: None)
    native.reset()
    assert "no C compiler" in native.how()
    native.reset()


def captioner_on_cpu(registry, captioner: Path):
    """The tiny captioner's checkpoint restored, the cpu (torch) backend for it, and a batch of 4."""
    from isthmus.train.restore import restore
    from isthmus.train.run import build_backend
    from isthmus.verify.dump import batch_recipe, checkpoint_config

    restored = restore(registry, captioner)
    _, backend = build_backend(checkpoint_config(registry, restored, ["backend=cpu"]), registry)
    return restored, backend, batch_recipe(restored.data.eval, 4, 0)[1]


def test_a_dump_pass_leaves_no_tensor_for_the_garbage_collector(registry, captioner):
    """After a recorded pass nothing it made sits in a reference cycle holding a tensor: a cycle
    through the caller's frame once kept every parameter, activation and gradient of a pass alive
    until the collector ran, so the heap grew (~0.3 MB a pass) and each pass touched fresh pages."""
    import gc

    import torch

    from isthmus.verify.dump import run_pass

    restored, backend, batch = captioner_on_cpu(registry, captioner)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for level in ("layer", "op"):
            run, _ = run_pass(backend, restored.model, restored.params, batch, "float32", level, "stats", "r")
            assert run["records"]["forward"] and run["records"]["backward"]
        gc.collect()
        stranded = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not stranded, f"{len(stranded)} tensors were left in reference cycles"


def test_kernel_notes_land_on_the_call_that_made_them(registry, captioner, monkeypatch):
    """A kernel that notes a fallback while a dump records it: the note is in the run's events
    under that call's name and op, at layer and at op level, and no other call takes it."""
    from isthmus.kernels import events
    from isthmus.verify.dump import run_pass

    restored, backend, batch = captioner_on_cpu(registry, captioner)
    plain_gelu = backend.kernels.gelu
    made = []

    def noting_gelu(x):
        made.append(1)
        events.note("fallback", f"gelu: generic kernel instead of the fused route (test {len(made)})")
        return plain_gelu(x)

    monkeypatch.setattr(backend.kernels, "gelu", noting_gelu)
    for level in ("layer", "op"):
        made.clear()
        run, _ = run_pass(backend, restored.model, restored.params, batch, "float32", level, "stats", "r")
        noted = [e for e in run["events"] if e["kind"] == "fallback"]
        assert len(noted) == len(made) > 1, (level, noted)
        assert all(e["op"] == "gelu" and e["name"].endswith(f"/gelu:{0}") for e in noted), noted
        assert [e["detail"][-7:] for e in noted] == [f"test {i})" for i in range(1, len(made) + 1)]
        assert len({e["call"] for e in noted}) == len(noted)


def test_statistics_read_after_the_pass_equal_the_ones_read_at_once(registry, captioner, monkeypatch):
    """A stats-mode pass reads its statistics in batches, after later kernel calls have run; they
    equal, bit for bit, the ones a tensors-mode pass reads as each record is taken, also when the
    batch fills mid-pass."""
    import isthmus.verify.capture as capture
    from isthmus.verify.dump import run_pass

    restored, backend, batch = captioner_on_cpu(registry, captioner)

    def rows(mode: str) -> dict[str, np.ndarray]:
        _, tensors = run_pass(backend, restored.model, restored.params, batch, "float32", "layer", mode, "r")
        return {d: tensors[f"r/stats/{d}"] for d in ("forward", "backward")}

    at_once = rows("tensors")
    assert at_once["forward"].shape[0] > 10 and at_once["backward"].shape[0] > 10
    for waiting in (capture.DEFER_ELEMENTS, 1000):
        monkeypatch.setattr(capture, "DEFER_ELEMENTS", waiting)
        deferred = rows("stats")
        for direction, matrix in at_once.items():
            assert np.array_equal(deferred[direction], matrix, equal_nan=True), (waiting, direction)


def test_vjp_probe_masks_exact_kinks_and_finds_a_wrong_derivative():
    from isthmus.verify.conformance import reference_backend
    from isthmus.verify.vjp import central_difference, directions_for, positions, probes, vjp_error

    kernels, _ = reference_backend()
    x = np.array([[-1.0, 0.0, 2.0], [3.0, -0.5, 0.0]])
    args, kwargs = (x,), {}
    where = positions(args, kwargs)
    cotangents, raw = probes(0, 0, [x.shape], [x.shape], "float64")
    directions = directions_for("relu", args, kwargs, where, raw)
    assert np.all(directions[0][x == 0] == 0) and np.all(directions[0][x != 0] != 0)
    (numeric, smooth), = central_difference(kernels.relu, "relu", args, kwargs, where, cotangents, directions)
    right = float(np.sum(cotangents[0] * (x > 0) * directions[0]))
    straight_through = float(np.sum(cotangents[0] * directions[0]))
    assert smooth and vjp_error(right, float(np.sum(np.abs(cotangents[0] * directions[0]))), numeric) < 1e-9
    assert vjp_error(straight_through, float(np.sum(np.abs(cotangents[0] * directions[0]))), numeric) > 1e-2


def test_a_torch_only_model_is_compared_against_its_own_float64_golden_or_a_bundle(registry, tmp_path, monkeypatch):
    """The NumPy reference cannot run a torch module: the golden bundle (the module in float64 on
    the cpu) is its truth; --reference BUNDLE still compares against one bundle."""
    from isthmus.train.run import compose_run, prepare
    from isthmus.train.trainer import Trainer
    from isthmus.verify.compare import compare

    (tmp_path / "tinynet.py").write_text(
        "import torch.nn as nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                                  nn.Flatten(), nn.Linear(4, 3))\n\n"
        "    def forward(self, images):\n"
        "        return self.body(images)\n\n\n"
        "def build():\n"
        "    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_run(registry, ["model=torch-module", "model.factory=tinynet:build", "model.loss=cross_entropy",
                                 "data=example-shapes", "data.num_train=32", "data.num_eval=8", "backend=cpu",
                                 "train.batch_size=8", "train.steps=3", "train.warmup_steps=1", "train.eval_every=0",
                                 f"output_dir={tmp_path / 'run'}"])
    Trainer(prepare(cfg, registry), tmp_path / "run").fit()
    target = dump_here(registry, tmp_path / "run", tmp_path / "cpu", "backend=cpu")
    golden = dump_here(registry, tmp_path / "run", tmp_path / "golden", "backend=cpu", golden=True)
    judged = compare([target, golden], registry=registry, echo=lambda line: None)
    assert judged.exit_code == 0 and judged.module and [t.label for t in judged.targets] == ["cpu"]
    assert {v.name for v in judged.targets[0].forward} >= {"body.0", "body.4"}
    comparison = compare([target, golden], reference=str(golden), registry=registry, echo=lambda line: None)
    assert comparison.exit_code == 0 and [t.label for t in comparison.targets] == ["cpu"]
    assert {v.name for v in comparison.targets[0].results} >= {"logits", "loss"}
