"""``tiny-t2i``: the visual tokenizer, the generator and decoder on every CPU engine, sampling,
training through the CLI, ONNX export, portability, the closed-loop evaluation and ``isthmus generate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from isthmus.data import DataSplits, make_dataset
from isthmus.models.t2i.model import TinyT2I
from isthmus.models.t2i.coded import CodedDataset, empty_captions
from isthmus.models.t2i.visual_tokenizer import VisualTokenizer, tiles, untile
from isthmus.models.t2i.evaluate import match_rates
from isthmus.models.t2i.sampling import choose, sample_codes
from isthmus.nn.params import initialise

TINY_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "decoder_d_model": 16, "decoder_heads": 2,
              "decoder_layers": 1, "codebook_size": 48}
TINY = ["backend=cpu", "model=tiny-t2i", *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
        "data.num_train=96", "data.num_eval=8", "train.batch_size=8", "train.warmup_steps=1", "train.steps=3",
        "train.eval_every=0", "train.checkpoint_every=0"]
# 25 steps at a high rate: enough for the judge to write captions of the scene grammar (still the
# same one for every image), so the closed-loop part rates are not all zero.
CAPTIONER = ["backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
             "data.num_train=64", "data.num_eval=8", "train.batch_size=8", "train.warmup_steps=1", "train.steps=25",
             "train.lr=1e-2", "train.eval_every=0", "train.checkpoint_every=0"]


def isthmus(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def scenes():
    train, evaluation, tokenizer = make_dataset({"num_train": 300, "num_eval": 16, "seed": 0})
    return train, evaluation, tokenizer


# ---- the visual tokenizer ---------------------------------------------------------------------


def test_tiles_and_untile_are_inverse(scenes):
    images = scenes[0].images[:5]
    assert tiles(images, 4).shape == (5, 64, 48)
    assert np.array_equal(untile(tiles(images, 4), 3, 4, 32), images)
    # Row-major over the grid: tile 1 is the second 4x4 block of the first row.
    assert np.array_equal(tiles(images, 4)[:, 1], images[:, :, 0:4, 4:8].reshape(5, -1))


def test_codebook_reconstructs_the_scenes_and_round_trips(scenes):
    train, evaluation, _ = scenes
    visual = VisualTokenizer.fit(train.images, patch=4, size=256, seed=0)
    codes = visual.encode(evaluation.images)
    assert codes.shape == (len(evaluation), 64) and codes.dtype == np.int64
    error = visual.reconstruction_error(evaluation.images)
    # Most tiles of a scene occur verbatim in the codebook; the held-out images decode nearly exactly.
    assert error["exact_pixels"] > 0.97 and error["mse"] < 0.03, error
    # Code 0 is the commonest tile: the black background.
    assert not visual.codebook[0].any()
    again = VisualTokenizer.from_dict(json.loads(json.dumps(visual.to_dict())))
    assert np.array_equal(again.codebook, visual.codebook) and np.array_equal(again.encode(evaluation.images), codes)
    with pytest.raises(ValueError, match="format"):
        VisualTokenizer.from_dict({"format": "something else"})


def test_codebook_never_has_more_codes_than_distinct_tiles():
    images = np.zeros((4, 3, 8, 8), np.uint8)
    images[0, 0, :4, :4] = 200  # two distinct tiles in all: black, and this red one
    visual = VisualTokenizer.fit(images, patch=4, size=16)
    assert visual.size == 2
    assert np.array_equal(visual.decode(visual.encode(images), 8), images)
    with pytest.raises(ValueError, match="codes must lie in 0..1"):
        visual.decode(np.array([[0, 5, 0, 0]]), 8)


# ---- batches ------------------------------------------------------------------------------------


def test_coded_batches_are_a_function_of_seed_and_indices(scenes):
    train, _, _ = scenes
    visual = VisualTokenizer.fit(train.images, 4, 64)
    data = CodedDataset(train, visual, seed=3)
    first, again = data.batch([5, 7, 9]), data.batch([5, 7, 9])
    for name in first:
        assert np.array_equal(first[name], again[name]), name
    assert not np.array_equal(first["noise"], data.batch([5, 7, 10])["noise"])
    assert not np.array_equal(first["noise"], CodedDataset(train, visual, seed=4).batch([5, 7, 9])["noise"])
    assert first["codes"].shape == (3, 64) and first["images"].shape == (3, 3, 32, 32)
    assert ((first["levels"] >= 0.05) & (first["levels"] <= 0.98)).all()
    # Resuming the iterator yields the very batches the original would have.
    stream = data.iter_batches(16, seed=1)
    next(stream)
    state = stream.state()
    expected = next(stream)
    resumed = next(data.resume(state))
    assert all(np.array_equal(expected[n], resumed[n]) for n in expected)


# ---- the networks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_batch(scenes):
    train, _, tokenizer = scenes
    model = TinyT2I(TINY_MODEL, tokenizer)
    coded = model.bind_data(DataSplits(train, scenes[1], tokenizer=tokenizer), seed=0, saved=None).train
    params = initialise(model.param_specs(), 0)
    # A decoder that starts at zero output would hide its inputs from the comparisons below.
    rng = np.random.default_rng(1)
    params = {n: a + rng.normal(0, 0.05, a.shape).astype(a.dtype) if n.startswith("dec.out") else a
              for n, a in params.items()}
    return model, params, coded.batch(np.arange(4))


def test_generator_is_causal_over_codes(usable_kernel_sets, model_and_batch):
    """Logits for position i must not change when codes i and later change; sampling's truncated
    calls must give the training forward's logits."""
    model, params, batch = model_and_batch
    label, k, engine = usable_kernel_sets[0]
    p = engine.parameters(params)
    with engine.no_grad():
        full = engine.to_numpy(model.forward(k, p, {n: engine.asarray(a) for n, a in batch.items()}))
        changed = batch["codes"].copy()
        changed[:, 10:] = (changed[:, 10:] + 7) % 48
        other = engine.to_numpy(model.forward(k, p, {**{n: engine.asarray(a) for n, a in batch.items()},
                                                     "codes": engine.asarray(changed)}))
        partial = engine.to_numpy(model.generator_logits(k, p, engine.asarray(batch["tokens"]),
                                                         engine.asarray(batch["codes"][:, :10])))
    assert full.shape == (4, 64, 48)
    np.testing.assert_allclose(other[:, :11], full[:, :11], atol=1e-5)
    assert np.abs(other[:, 11:] - full[:, 11:]).max() > 1e-3
    np.testing.assert_allclose(partial, full[:, :11], atol=1e-5)


def test_forward_loss_and_decoder_agree_on_every_cpu_engine(usable_kernel_sets, reference_kernel_set, model_and_batch):
    """Same weights, same batch: torch, MindSpore (and any other usable engine) match the float64
    reference within float32 tolerance, for the generator's logits, the loss and the decoder."""
    model, params, batch = model_and_batch
    _, rk, rengine = reference_kernel_set

    def run(k, engine, dtype=None):
        p = engine.parameters({n: a.astype(dtype) if dtype else a for n, a in params.items()})
        b = {n: engine.asarray(a.astype(dtype) if dtype and a.dtype.kind == "f" else a) for n, a in batch.items()}
        with engine.no_grad():
            logits = model.forward(k, p, b)
            loss, metrics = model.loss(k, p, b, training=False)
            noise = model.predict_noise(k, p, model.noised(k, b["images"], b["noise"], b["levels"]), b["codes"], b["levels"])
            return [np.asarray(engine.to_numpy(t), dtype=np.float64) for t in (logits, loss, metrics["noise_mse"], noise)]

    want = run(rk, rengine, "float64")
    engines = {label.split("/")[1] for label, _, _ in usable_kernel_sets}
    assert {"torch", "mindspore"} <= engines, engines
    for label, k, engine in usable_kernel_sets:
        got = run(k, engine)
        for name, g, w in zip(("logits", "loss", "noise_mse", "noise estimate"), got, want):
            bound = 1e-4 * max(1.0, float(np.abs(w).max()))
            assert np.abs(g - w).max() <= bound, (label, name, float(np.abs(g - w).max()))


def test_caption_dropout_empties_that_share_of_training_captions(scenes):
    train, _, _ = scenes
    visual = VisualTokenizer.fit(train.images, 4, 64)
    dropped = CodedDataset(train, visual, caption_dropout=0.25).batch(np.arange(len(train)))["tokens"]
    kept = CodedDataset(train, visual).batch(np.arange(len(train)))["tokens"]
    empty = (dropped == empty_captions(len(train), dropped.shape[1])).all(axis=1)
    assert 0.15 < empty.mean() < 0.35
    assert np.array_equal(dropped[~empty], kept[~empty]) and not (kept == dropped).all()


def test_guidance_contrasts_the_caption_with_the_empty_one(usable_kernel_sets, model_and_batch):
    model, params, batch = model_and_batch
    _, k, engine = usable_kernel_sets[0]
    backend = SimpleNamespace(kernels=k, engine=engine)
    p = engine.parameters(params)
    tokens = batch["tokens"][:2]
    plain = sample_codes(model, backend, p, tokens, np.random.default_rng(0), 0.0, 0, guidance=1.0)
    # Guidance 0 is the empty caption's own choice, whatever the prompt says.
    unconditional = sample_codes(model, backend, p, tokens, np.random.default_rng(0), 0.0, 0, guidance=0.0)
    alone = sample_codes(model, backend, p, empty_captions(2, tokens.shape[1]), np.random.default_rng(0), 0.0, 0)
    assert np.array_equal(unconditional, alone)
    assert plain.shape == (2, 64) and not np.array_equal(plain, alone)


def test_choose_follows_temperature_top_k_and_the_seed():
    logits = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 9.0]])
    rng = np.random.default_rng(0)
    assert choose(logits, rng, 0.0, 0, 4).tolist() == [1, 3]
    assert choose(logits, rng, 1.0, 1, 4).tolist() == [1, 3]
    assert choose(logits, rng, 1.0, 0, 3).tolist()[1] == 0  # code 3 is outside the codebook here
    draws = np.array([choose(logits[:1], rng, 1.0, 2, 4)[0] for _ in range(400)])
    assert set(draws) == {1, 3}  # top-2 only
    assert 0.6 < np.mean(draws == 1) < 0.85  # softmax of (3, 2): 0.73
    a = choose(np.zeros((50, 8)), np.random.default_rng(7), 1.0, 0, 8)
    b = choose(np.zeros((50, 8)), np.random.default_rng(7), 1.0, 0, 8)
    assert np.array_equal(a, b) and len(set(a.tolist())) > 3


def test_match_rates_compare_structure_not_word_order():
    rates = match_rates(["a blue square right of a red circle", "a red circle", "nonsense"],
                        ["a red circle left of a blue square", "a red square", "a red circle"])
    assert rates["closed_loop_match"] == pytest.approx(1 / 3)
    assert rates["closed_loop_colours"] == pytest.approx(2 / 3)
    assert rates["closed_loop_shapes"] == pytest.approx(1 / 3)


# ---- through the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("judge")
    result = isthmus("train", *CAPTIONER, f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, judge) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("t2i")
    result = isthmus("train", *TINY, f"model.judge={judge}", f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_training_writes_metrics_grid_and_closed_loop(trained):
    run_dir, result = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert {"eval_loss", "code_accuracy", "noise_mse", "closed_loop_match", "judge_on_real"} <= set(final)
    from PIL import Image

    grid = Image.open(run_dir / "samples.png")
    assert grid.size[0] >= 4 * 128 and grid.size[1] >= 2 * 128  # 8 prompts, 4 to a row, 32 px x 4
    assert "closed loop" in result.stdout and "samples.png" in result.stdout
    from isthmus.train.checkpoint import load_checkpoint

    saved = load_checkpoint(run_dir).state.extra["model_data"]["visual_tokenizer"]
    assert VisualTokenizer.from_dict(saved).size <= TINY_MODEL["codebook_size"]


def grid_images(path: Path, count: int, side: int, columns: int = 4, scale: int = 4) -> np.ndarray:
    """The ``count`` pictures of a samples grid, back at ``side`` pixels: ``(count, 3, side, side)``."""
    from PIL import Image

    sheet = np.asarray(Image.open(path).convert("RGB"))
    rows = -(-count // columns)
    cell_h, cell_w = sheet.shape[0] // rows, sheet.shape[1] // columns
    shown = side * scale
    images = []
    for i in range(count):
        y, x = (i // columns) * cell_h, (i % columns) * cell_w + (cell_w - shown) // 2
        crop = sheet[y:y + shown, x:x + shown]
        small = crop[::scale, ::scale]
        assert np.array_equal(np.repeat(np.repeat(small, scale, 0), scale, 1), crop), f"picture {i} is not where expected"
        images.append(np.moveaxis(small, -1, 0))
    return np.stack(images)


def test_closed_loop_rates_are_what_the_judge_reads_in_the_samples(trained, judge):
    # Recomputed here from the written samples grid (the images the run generated), the held-out
    # prompts and the judge: each reported rate must be the share of images whose reading matches.
    from isthmus.data import caption_matches
    from isthmus.models.t2i.evaluate import Judge
    from isthmus.registry.manager import get_registry
    from isthmus.train.restore import build_label, restore

    run_dir, _ = trained
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "eval"][-1]
    restored = restore(get_registry(), run_dir)
    count = final["samples"]
    prompts = [restored.data.eval.captions[i] for i in range(count)]
    images = grid_images(run_dir / "samples.png", count, int(restored.config.model.image_size))
    reader = Judge(judge, build_label(get_registry(), "cpu"))
    matches = [caption_matches(read, prompt) for read, prompt in zip(reader.captions(images), prompts)]
    for part in ("exact", "count", "colours", "shapes", "relations"):
        key = "closed_loop_match" if part == "exact" else f"closed_loop_{part}"
        assert final[key] == pytest.approx(np.mean([m[part] for m in matches])), key
    assert final["closed_loop_count"] > 0  # the judge writes grammatical captions: the rates can differ
    real = reader.captions(restored.data.eval.source.images[:count])
    assert final["judge_on_real"] == pytest.approx(np.mean([caption_matches(r, p)["exact"] for r, p in zip(real, prompts)]))


@pytest.mark.slow  # three generate subprocesses; closed-loop, guidance and refusal tests keep sampling fast
def test_generate_writes_a_png_and_is_reproducible(trained, tmp_path):
    run_dir, _ = trained
    prompt = "a red circle left of a blue square"
    out = tmp_path / "one.png"
    result = isthmus("generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--out", str(out),
                     "--count", "2", "--seed", "5", "--scale", "2")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    first = np.asarray(Image.open(out))
    assert first.shape == (64, 128, 3)
    again = tmp_path / "two.png"
    assert isthmus("generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--out", str(again), "--count", "2",
                   "--seed", "5", "--scale", "2").returncode == 0
    assert np.array_equal(first, np.asarray(Image.open(again)))
    default = isthmus("generate", "--checkpoint", str(run_dir), "--prompt", "a green cross", "backend=cpu")
    assert default.returncode == 0, default.stderr
    assert (run_dir / "generated" / "a-green-cross-seed0.png").is_file()


@pytest.mark.slow  # trains on MindSpore
def test_generate_refuses_bad_input_in_one_line(trained, judge, tmp_path):
    run_dir, _ = trained
    one_line_error(isthmus("generate", "--checkpoint", str(run_dir), "--prompt", "a pink circle"),
                   "'pink'", "known words", "red")
    one_line_error(isthmus("generate", "--checkpoint", str(run_dir), "--prompt", "a red circle", "--count", "0"),
                   "--count: expected an integer from 1 to 1024, got 0")
    one_line_error(isthmus("generate", "--checkpoint", str(run_dir), "--prompt", "a red circle",
                           "--out", str(tmp_path / "x.jpg")), ".png")
    one_line_error(isthmus("generate", "--checkpoint", str(judge), "--prompt", "a red circle"),
                   "tiny-captioner", "model=tiny-t2i")
    one_line_error(isthmus("eval", "--checkpoint", str(run_dir), "--option", f"judge={tmp_path / 'missing'}"), "missing")
    one_line_error(isthmus("caption", "--checkpoint", str(run_dir), "--image", str(tmp_path / "x.png")),
                   "tiny-t2i", "does not caption")


def test_eval_reports_the_closed_loop_with_a_given_judge(trained, judge, tmp_path):
    run_dir, _ = trained
    result = isthmus("eval", "--checkpoint", str(run_dir), "--option", f"judge={judge}", "--out", str(tmp_path), "--max-samples", "4")
    assert result.returncode == 0, result.stderr
    assert "closed loop" in result.stdout and "of 4 generated images" in result.stdout
    assert (tmp_path / "samples.png").is_file()


def test_config_rules_name_the_key(tmp_path):
    result = isthmus("config", "show", "model=tiny-t2i", "model.decoder_d_model=30", "model.decoder_heads=4")
    one_line_error(result, "model.decoder_d_model", "30")
    result = isthmus("config", "show", "model=tiny-t2i", "model.codebook_size=1")
    assert result.returncode == 2 and "model.codebook_size" in result.stderr
    # The scenes' longest caption takes 15 tokens; a table of 8 caption positions cannot read it.
    result = isthmus("train", *TINY, "model.max_caption_len=8", f"output_dir={tmp_path / 'run'}")
    one_line_error(result, "model.max_caption_len is 8", "at least 15")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # export plus four-backend portability
def test_export_and_portability_across_engines(trained, tmp_path):
    run_dir, _ = trained
    from isthmus.export.pipeline import export_checkpoint
    from isthmus.registry.manager import get_registry
    from isthmus.verify.portability import run_portability

    registry = get_registry()
    outcome = export_checkpoint(registry, run_dir, output=tmp_path / "t2i.onnx", echo=lambda line: None)
    assert outcome.exit_code == 0, [(c.name, c.max_abs_err, c.bound) for c in outcome.checks]
    assert [c.name for c in outcome.checks] == ["logits, batch 1"]  # no caption decoding for an image model
    import onnx

    inputs = {i.name for i in onnx.load(str(tmp_path / "t2i.onnx")).graph.input}
    assert {"tokens", "codes"} <= inputs and "noise" not in inputs
    report = run_portability(registry, run_dir, ["cpu", "cpu:mindspore", "onnxruntime", "reference"],
                             out_dir=tmp_path / "report", echo=lambda line: None)
    assert report.exit_code == 0
    by_label = {t.label: t for t in report.targets}
    for label in ("cpu", "cpu:mindspore", "onnxruntime"):
        assert by_label[label].status == "compared" and not by_label[label].breach, label


@pytest.mark.slow  # each case loads the model; tests/bad_runs.yaml keeps generate's hostile cases fast
def test_trains_on_mindspore_and_generates_the_same_image_as_torch(tmp_path):
    """The engine is a config choice for tiny-t2i too: MindSpore lowers the loss, and a checkpoint draws
    the same picture through either engine (greedy codes, seeded decoder noise)."""
    run_dir = tmp_path / "ms"
    result = isthmus("train", *TINY, "backend.engine=mindspore", "train.steps=12", "train.lr=3e-3", "train.log_every=1",
                     f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], losses
    from isthmus.train.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir).state.engine == "mindspore"
    from PIL import Image

    drawn = {}
    for engine in ("mindspore", "torch"):
        out = tmp_path / f"{engine}.png"
        done = isthmus("generate", "--checkpoint", str(run_dir), "--prompt", "a red circle left of a blue square",
                       "--top-k", "1", "--seed", "3", "--out", str(out), f"backend.engine={engine}")
        assert done.returncode == 0, done.stderr
        drawn[engine] = np.asarray(Image.open(out)).astype(np.int16)
    # float32 rounding may move a pixel across a uint8 step, never further.
    assert np.abs(drawn["mindspore"] - drawn["torch"]).max() <= 1
