"""GLM-Image's DiT decoder against diffusers: the prediction, the sampler's schedule and trajectory,
the diffusers checkpoint layout, training and portability from a converted checkpoint.

The oracle is diffusers 0.42 (the ``hf`` extra) on tiny random configs built here, never downloaded
(:mod:`diffusers_oracle`). float32 compares with diffusers as it is; float64 with diffusers' three
float32 computations run in float64 (:func:`diffusers_oracle.in_float64`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_oracle import (CONFIGS, SCHEDULER, VAE_CONFIGS, canonical, dit_model, dit_predict, in_float64,
                              inputs, pipeline_schedule, section_of, vae_model)
from isthmus.backends.torch.engine import TorchEngine
from isthmus.backends.torch.kernels import kernel_table as torch_table
from isthmus.errors import IsthmusError
from isthmus.kernels.routing import KernelSet
from isthmus.models.glm_image_dit.model import GlmImageDit
from isthmus.models.glm_image_dit.sampler import Schedule, sample, schedule_from_config, timesteps_and_sigmas

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
TORCH = {"float32": torch.float32, "float64": torch.float64}


def torch_kernels() -> KernelSet:
    return KernelSet("cpu", "torch", torch_table(TorchEngine("cpu", seed=0)))


def on_torch(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(a, dtype=TORCH[dtype]) if a.dtype.kind == "f" else torch.tensor(a)
            for name, a in arrays.items()}


def predict(model: GlmImageDit, params: dict[str, np.ndarray], feeds: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    p, f = on_torch(params, dtype), on_torch(feeds, dtype)
    out = model.predict(torch_kernels(), p, f["latents"], f["timestep"], f["text"], f["prior_tokens"], f["prior_drop"],
                        f["target_size"], f["crop_coords"])
    assert out.dtype == TORCH[dtype]
    return out.double().numpy()


def relative(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- the prediction --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_prediction_matches_diffusers(index, dtype):
    config = CONFIGS[index]
    oracle = dit_model(config, seed=index)
    model = GlmImageDit(section_of(oracle))
    feeds = inputs(config, seed=10 + index)
    with in_float64() if dtype == "float64" else contextlib.nullcontext():
        want = dit_predict(oracle, feeds, TORCH[dtype])
    got = predict(model, canonical(oracle), feeds, dtype)
    assert got.shape == (2, config["out_channels"], *feeds["latents"].shape[2:])
    assert relative(got, want) <= TOLERANCE[dtype]


def test_the_comparison_sees_every_input_and_float32_rounding():
    """The parity test can fail: each conditioning input moves the prediction far beyond the
    tolerance, and diffusers' unpatched float64 (float32 sinusoids and rotation) is off by more than
    the float64 tolerance."""
    config = CONFIGS[0]
    oracle = dit_model(config)
    model, params, feeds = GlmImageDit(section_of(oracle)), canonical(oracle), inputs(config)
    base = predict(model, params, feeds, "float64")
    changes = {"timestep": feeds["timestep"] + 1, "text": feeds["text"] * 1.01, "prior_drop": ~feeds["prior_drop"],
               "prior_tokens": (feeds["prior_tokens"] + 1) % config["prior_vq_quantizer_codebook_size"],
               "target_size": feeds["target_size"] + 8, "crop_coords": feeds["crop_coords"] + 1}
    for name, value in changes.items():
        assert relative(predict(model, params, {**feeds, name: value}, "float64"), base) > 1e-4, name
    assert relative(dit_predict(oracle, feeds, torch.float64), base) > 1e-9


def test_every_canonical_tensor_maps_to_one_diffusers_tensor():
    oracle = dit_model(CONFIGS[1])
    model = GlmImageDit(section_of(oracle))
    params = canonical(oracle)  # raises if a diffusers tensor has no rule
    specs = model.param_specs()
    assert list(params) == list(specs)
    assert all(params[name].shape == spec.shape for name, spec in specs.items())


# ---- the sampler -----------------------------------------------------------------------------------


SCHEDULES = [SCHEDULER, dict(SCHEDULER, time_shift_type="exponential", base_shift=0.5, max_shift=1.15),
             dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)]


@pytest.mark.parametrize("config", SCHEDULES)
def test_schedule_matches_the_pipelines_scheduler(config):
    for steps in (1, 4, 50):
        for seq_len in (12, 4096):
            scheduler = pipeline_schedule(steps, seq_len, config)
            timesteps, sigmas = timesteps_and_sigmas(steps, seq_len, schedule_from_config(config))
            assert timesteps.dtype == sigmas.dtype == np.float32
            np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
            np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())


def oracle_trajectory(oracle, feeds, negative, steps, guidance, dtype) -> np.ndarray:
    """The pipeline's denoising loop on diffusers' transformer and scheduler. float32: the scheduler's
    own step; float64: the same Euler update on the scheduler's sigmas (its step casts to float32)."""
    t_dtype = TORCH[dtype]
    oracle = oracle.to(t_dtype)
    count = feeds["prior_tokens"].shape[1]
    scheduler = pipeline_schedule(steps, count)
    x = torch.tensor(feeds["latents"], dtype=t_dtype)
    fixed = dict(prior_token_id=torch.tensor(feeds["prior_tokens"]),
                 target_size=torch.tensor(feeds["target_size"], dtype=t_dtype),
                 crop_coords=torch.tensor(feeds["crop_coords"], dtype=t_dtype), return_dict=False)
    keep = torch.zeros(feeds["prior_tokens"].shape, dtype=torch.bool)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(x.shape[0]) - 1
            v = oracle(hidden_states=x, encoder_hidden_states=torch.tensor(feeds["text"], dtype=t_dtype),
                       prior_token_drop=keep, timestep=timestep, **fixed)[0]
            if guidance > 1:
                u = oracle(hidden_states=x, encoder_hidden_states=torch.tensor(negative, dtype=t_dtype),
                           prior_token_drop=~keep, timestep=timestep, **fixed)[0]
                v = u + guidance * (v - u)
            if dtype == "float32":
                x = scheduler.step(v.float(), t, x, return_dict=False)[0]
            else:
                x = x + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]).double() * v
    return x.double().numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("index, guidance", [(0, 1.5), (1, 1.0)])
def test_sampler_trajectory_matches_diffusers(index, guidance, dtype):
    config, steps = CONFIGS[index], 4
    oracle = dit_model(config, seed=index)
    model = GlmImageDit(section_of(oracle))
    feeds = inputs(config, seed=20 + index)
    negative = np.random.default_rng(index).standard_normal((2, 3, config["text_embed_dim"]))
    with in_float64() if dtype == "float64" else contextlib.nullcontext():
        want = oracle_trajectory(oracle, feeds, negative, steps, guidance, dtype)
    batch = on_torch({"noise": feeds["latents"], "text": feeds["text"], "negative_text": negative,
                      "prior_tokens": feeds["prior_tokens"], "target_size": feeds["target_size"],
                      "crop_coords": feeds["crop_coords"]}, dtype)
    with torch.no_grad():
        got = sample(model, torch_kernels(), on_torch(canonical(oracle), dtype), batch, steps=steps,
                     guidance_scale=guidance).double().numpy()
    assert relative(got, want) <= TOLERANCE[dtype]
    assert relative(got, feeds["latents"]) > 0.1  # the trajectory went somewhere


def test_sampler_refusals():
    oracle = dit_model(CONFIGS[2])
    model = GlmImageDit(section_of(oracle))
    with pytest.raises(IsthmusError, match=r"in_channels \(3\) != model.out_channels \(5\)"):
        sample(model, torch_kernels(), {}, {})
    square = GlmImageDit(section_of(dit_model(CONFIGS[0])))
    feeds = on_torch({"noise": np.zeros((1, 4, 4, 4)), "text": np.zeros((1, 2, 12)),
                      "prior_tokens": np.zeros((1, 4), np.int64), "target_size": np.ones((1, 2)),
                      "crop_coords": np.zeros((1, 2))}, "float32")
    with pytest.raises(IsthmusError, match="negative_text"):
        sample(square, torch_kernels(), {}, feeds, steps=1, guidance_scale=2.0)
    with pytest.raises(IsthmusError, match="use_karras_sigmas"):
        schedule_from_config({"use_karras_sigmas": True})
    with pytest.raises(IsthmusError, match="time_shift_type"):
        Schedule(time_shift_type="cosine")
    with pytest.raises(IsthmusError, match="steps 0"):
        timesteps_and_sigmas(0, 16)


def test_config_rules_are_one_line_each():
    with pytest.raises(ValueError, match="attention_head_dim: 6 is not a multiple of 4"):
        GlmImageDit({"name": "glm-image-dit", "attention_head_dim": 6})
    with pytest.raises(ValueError, match="condition_dim: 5 is odd"):
        GlmImageDit({"name": "glm-image-dit", "condition_dim": 5})


# ---- the diffusers layout --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    """A DiT as diffusers' save_pretrained writes it: bfloat16, sharded, with an index."""
    out = tmp_path_factory.mktemp("dit") / "transformer"
    dit_model(CONFIGS[0]).to(torch.bfloat16).save_pretrained(out, max_shard_size="20KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return out


def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_save_pretrained_round_trips_bitwise_and_loads_in_diffusers(diffusers_dir, tmp_path, capsys):
    from diffusers import GlmImageTransformer2DModel

    from isthmus.cli.main import main

    assert main(["convert", str(diffusers_dir), "--to", "isthmus", "--output", str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to", "hf", "--output", str(tmp_path / "back"),
                 "--max-shard-size", "20KB"]) == 0
    capsys.readouterr()
    source, back = raw_tensors(diffusers_dir), raw_tensors(tmp_path / "back")
    assert source.keys() == back.keys()
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(back[name].view(torch.int16), tensor.view(torch.int16)), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((diffusers_dir / "config.json").read_text())
    index = json.loads((tmp_path / "back" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = GlmImageTransformer2DModel.from_pretrained(tmp_path / "back", torch_dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, source[name]), name
    # The isthmus side: float32 masters under canonical names and a run config with fitting latents.
    from isthmus.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "run")
    assert {a.dtype.name for a in checkpoint.params.values()} == {"float32"}
    assert "blocks.1.ada.weight" in checkpoint.params
    data = checkpoint.state.config["data"]
    assert (data["name"], data["latent_channels"], data["codebook_size"]) == ("dit-latents", 4, 50)


def test_a_mindspore_checkpoint_of_the_dit_converts_back_bitwise(diffusers_dir, tmp_path, capsys):
    import mindspore as ms

    from isthmus.cli.main import main

    assert main(["convert", str(diffusers_dir), "--to", "mindspore", "--output", str(tmp_path / "ms")]) == 0
    assert main(["convert", str(tmp_path / "ms"), "--to", "hf", "--output", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    loaded = ms.load_checkpoint(str(tmp_path / "ms" / "model.ckpt"), crc_check=True)
    assert "blocks.0.attn.q.weight" in loaded and "prior_embed.weight" in loaded
    source, back = raw_tensors(diffusers_dir), raw_tensors(tmp_path / "back")
    assert source.keys() == back.keys()
    for name, tensor in source.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name].view(torch.int16), tensor.view(torch.int16))


def test_a_written_config_without_an_original_loads_in_diffusers(diffusers_dir, tmp_path, capsys):
    """From a run trained here (no diffusers config to keep), the layout writes config.json itself."""
    from diffusers import GlmImageTransformer2DModel

    from isthmus.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "model=glm-image-dit", "data=dit-latents", "model.num_layers=1", "data.num_train=8",
                 "data.num_eval=2", "train.steps=1", "train.warmup_steps=0", "train.batch_size=2",
                 f"output_dir={run}", "--no-progress"]) == 0
    assert main(["convert", str(run), "--to", "hf", "--dtype", "float32", "--output", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "GlmImageTransformer2DModel" and config["num_layers"] == 1
    loaded = GlmImageTransformer2DModel.from_pretrained(tmp_path / "out")
    from isthmus.train.checkpoint import load_checkpoint

    params = load_checkpoint(run).params
    assert torch.equal(loaded.state_dict()["proj_out.weight"], torch.from_numpy(params["out.weight"]))


def test_foreign_configs_that_do_not_fit_are_refused_in_one_line(diffusers_dir, tmp_path, capsys):
    import shutil

    from isthmus.cli.main import main

    bad = tmp_path / "bad"
    shutil.copytree(diffusers_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    assert main(["convert", str(bad), "--to", "isthmus", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformer_blocks.2" in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
    (bad / "config.json").write_text(json.dumps({**config, "attention_head_dim": "8"}))
    assert main(["convert", str(bad), "--to", "isthmus", "--output", str(tmp_path / "x")]) == 2
    assert "attention_head_dim" in capsys.readouterr().err


# ---- training and portability from a converted checkpoint ------------------------------------------


@pytest.mark.slow
def test_a_converted_checkpoint_trains_on_torch_and_mindspore_and_passes_portability(diffusers_dir, tmp_path, capsys):
    """The same converted weights: forward, loss and gradients on cpu, cpu:mindspore, ONNX Runtime
    against the reference, and 5 training steps on torch and MindSpore within the training band."""
    from isthmus.cli.main import main
    from isthmus.registry.manager import get_registry
    from isthmus.verify.compare import TRAIN_BAND
    from isthmus.verify.portability import run_portability

    assert main(["convert", str(diffusers_dir), "--to", "isthmus", "--output", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    report = run_portability(get_registry(), tmp_path / "run", ["cpu", "cpu:mindspore", "onnxruntime", "reference"],
                             out_dir=tmp_path / "report", train_steps=5, echo=lambda line: None)
    assert report.exit_code == 0
    by_label = {t.label: t for t in report.targets}
    assert by_label["reference"].status == "golden"
    for label in ("cpu", "cpu:mindspore", "onnxruntime"):
        assert by_label[label].status == "compared" and not by_label[label].breach, label
    torch_curve, ms_curve = by_label["cpu"].train["losses"], by_label["cpu:mindspore"].train["losses"]
    assert len(torch_curve) == len(ms_curve) == 5 and torch_curve[-1] < torch_curve[0]
    gap = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ms_curve, torch_curve))
    assert gap <= TRAIN_BAND["float32"] and by_label["cpu:mindspore"].train_ok


# ---- isthmus generate --------------------------------------------------------------------------------


def test_upsample_puts_each_generator_token_over_its_two_by_two_patches():
    from isthmus.models.glm_image_dit.commands import upsample

    tokens = np.array([[1, 2, 3, 4, 5, 6]])  # a 2 x 3 grid
    assert upsample(tokens, 2, 3).reshape(4, 6).tolist() == [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3],
                                                             [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]


def test_generate_from_prior_tokens_writes_the_samplers_latents(diffusers_dir, tmp_path, capsys):
    """The command on a diffusers directory: its latents are the sampler's on the same noise,
    upsampled tokens, sizes and (zero) glyph embeddings, and it says that the VAE stage is missing."""
    from isthmus.cli.main import main

    tokens = np.array([[3, 7, 11, 49]])
    np.save(tmp_path / "prior.npy", tokens)
    out = tmp_path / "latents.npy"
    assert main(["generate", "--checkpoint", str(diffusers_dir), "--prior-tokens", str(tmp_path / "prior.npy"),
                 "--height", "64", "--width", "64", "--steps", "3", "--guidance-scale", "2", "--seed", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "VAE stage is missing" in printed and "latents, not pixels" in printed and not out.with_suffix(".png").exists()
    got = np.load(out)
    oracle = dit_model(CONFIGS[0]).to(torch.bfloat16).float()  # the weights the directory holds
    model = GlmImageDit(section_of(oracle))
    grid = tokens.reshape(2, 2).repeat(2, axis=0).repeat(2, axis=1).reshape(1, 16)
    batch = on_torch({"noise": np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32),
                      "text": np.zeros((1, 1, 12)), "negative_text": np.zeros((1, 1, 12)), "prior_tokens": grid,
                      "target_size": np.array([[64.0, 64.0]]), "crop_coords": np.zeros((1, 2))}, "float32")
    with torch.no_grad():
        want = sample(model, torch_kernels(), on_torch(canonical(oracle), "float32"), batch, steps=3,
                      guidance_scale=2.0).numpy()
    assert got.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_generate_reads_a_scheduler_config(diffusers_dir, tmp_path, capsys):
    """--scheduler-config: the sampler's sigmas come from the file (here a static shift of 3), and a
    setting the sampler does not implement is refused in one line."""
    from isthmus.cli.main import main

    np.save(tmp_path / "prior.npy", np.array([3, 7, 11, 49]))
    (tmp_path / "static.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                      "use_dynamic_shifting": False, "shift": 3.0}))
    (tmp_path / "karras.json").write_text(json.dumps({"use_karras_sigmas": True}))
    base = ["generate", "--checkpoint", str(diffusers_dir), "--prior-tokens", str(tmp_path / "prior.npy"), "--height",
            "64", "--width", "64", "--steps", "2", "--guidance-scale", "1", "--seed", "1"]
    assert main([*base, "--scheduler-config", str(tmp_path / "static.json"), "--out", str(tmp_path / "a.npy")]) == 0
    assert main([*base, "--out", str(tmp_path / "b.npy")]) == 0
    assert main([*base, "--scheduler-config", str(tmp_path / "karras.json"), "--out", str(tmp_path / "c.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "use_karras_sigmas" in err and len(err.splitlines()) == 1
    oracle = dit_model(CONFIGS[0]).to(torch.bfloat16).float()
    grid = np.array([[3, 7], [11, 49]]).repeat(2, axis=0).repeat(2, axis=1).reshape(1, 16)
    batch = on_torch({"noise": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32),
                      "text": np.zeros((1, 1, 12)), "prior_tokens": grid, "target_size": np.array([[64.0, 64.0]]),
                      "crop_coords": np.zeros((1, 2))}, "float32")
    with torch.no_grad():
        want = sample(GlmImageDit(section_of(oracle)), torch_kernels(), on_torch(canonical(oracle), "float32"), batch,
                      steps=2, schedule=Schedule(use_dynamic_shifting=False, shift=3.0)).numpy()
    got = np.load(tmp_path / "a.npy")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert np.abs(got - np.load(tmp_path / "b.npy")).max() > 1e-3  # the default schedule differs


def test_generate_refuses_what_does_not_fit_in_one_line(diffusers_dir, tmp_path, capsys):
    from isthmus.cli.main import main

    np.save(tmp_path / "prior.npy", np.array([1, 2, 3]))
    np.save(tmp_path / "big.npy", np.array([1, 2, 3, 50]))
    base = ["generate", "--checkpoint", str(diffusers_dir), "--steps", "1", "--out", str(tmp_path / "x.npy")]
    cases = [(["--prior-tokens", str(tmp_path / "prior.npy"), "--height", "64", "--width", "64"], "expected 4 integer"),
             (["--prior-tokens", str(tmp_path / "big.npy"), "--height", "64", "--width", "64"], "outside the DiT's codebook"),
             (["--prior-tokens", str(tmp_path / "prior.npy"), "--height", "40"], "--height 40: must be a positive multiple of 32"),
             (["--ar-checkpoint", str(diffusers_dir), "--height", "64", "--width", "64"], "needs --prompt-ids")]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.slow
def test_generate_runs_the_generator_then_the_dit(tmp_path, capsys):
    """Prompt ids -> the generator checkpoint's image tokens (preview grid, then the target grid) ->
    the DiT: the same latents as handing the generator's target-grid tokens over by file."""
    from isthmus.cli.main import main
    from isthmus.registry.manager import get_registry
    from isthmus.train.restore import build_label, restore

    ar, dit = tmp_path / "ar", tmp_path / "dit"
    assert main(["train", "model=glm-image-ar", "model.num_hidden_layers=1", "model.vision_depth=1",
                 "data.num_train=8", "data.num_eval=2", "train.steps=1", "train.warmup_steps=0", "train.batch_size=2",
                 f"output_dir={ar}", "--no-progress"]) == 0
    assert main(["train", "model=glm-image-dit", "data=dit-latents", "model.num_layers=1",
                 "model.prior_vq_quantizer_codebook_size=144", "data.codebook_size=144", "data.num_train=8",
                 "data.num_eval=2", "train.steps=1", "train.warmup_steps=0", "train.batch_size=2",
                 f"output_dir={dit}", "--no-progress"]) == 0
    prompt = [140, 150, 128]
    common = ["generate", "--checkpoint", str(dit), "--height", "64", "--width", "96", "--steps", "2"]
    assert main([*common, "--ar-checkpoint", str(ar), "--prompt-ids", ",".join(map(str, prompt)),
                 "--preview-grid", "1x1", "--out", str(tmp_path / "chain.npy")]) == 0
    registry = get_registry()
    restored = restore(registry, ar)
    backend = build_label(registry, "cpu")
    with backend.engine.no_grad():
        drawn = restored.model.generate(backend.kernels, backend.engine.parameters(restored.params),
                                        {"tokens": backend.engine.asarray(np.array([prompt]))}, grids=[(1, 1), (2, 3)])
    drawn = np.asarray(backend.engine.to_numpy(drawn))
    assert drawn.shape == (1, 7)
    np.save(tmp_path / "prior.npy", drawn[:, 1:])
    assert main([*common, "--prior-tokens", str(tmp_path / "prior.npy"), "--out", str(tmp_path / "file.npy")]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.load(tmp_path / "chain.npy"), np.load(tmp_path / "file.npy"))


# ---- the VAE decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("index", range(len(VAE_CONFIGS)))
def test_vae_decoder_matches_diffusers(index, dtype, tmp_path):
    from isthmus.models.glm_image_dit import vae

    oracle = vae_model(VAE_CONFIGS[index], seed=index)
    oracle.save_pretrained(tmp_path)
    config, weights = vae.read_vae(tmp_path)
    assert all(name.startswith(("decoder.", "post_quant_conv.")) for name in weights)
    latents = np.random.default_rng(index).standard_normal((2, config.latent_channels, 5, 6))
    with torch.no_grad():
        want = oracle.to(TORCH[dtype]).decode(torch.tensor(latents, dtype=TORCH[dtype])).sample.double().numpy()
    got = vae.decode(torch_kernels(), config, on_torch(weights, dtype), torch.tensor(latents, dtype=TORCH[dtype]))
    assert got.dtype == TORCH[dtype]
    assert relative(got.double().numpy(), want) <= TOLERANCE[dtype]


def test_generate_decodes_with_a_vae_like_the_pipeline(diffusers_dir, tmp_path, capsys):
    """--vae: the PNG holds diffusers' AutoencoderKL decode of the written latents after the pipeline's
    latents * std + mean, post-processed by diffusers' VaeImageProcessor."""
    from PIL import Image
    from diffusers.image_processor import VaeImageProcessor

    from isthmus.cli.main import main

    oracle = vae_model(dict(VAE_CONFIGS[0], block_out_channels=(8, 8, 8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
    oracle.save_pretrained(tmp_path / "vae")
    np.save(tmp_path / "prior.npy", np.array([3, 7, 11, 49]))
    out = tmp_path / "latents.npy"
    assert main(["generate", "--checkpoint", str(diffusers_dir), "--prior-tokens", str(tmp_path / "prior.npy"),
                 "--height", "64", "--width", "64", "--steps", "2", "--count", "2", "--out", str(out),
                 "--vae", str(tmp_path / "vae")]) == 0
    assert "VAE stage is missing" not in capsys.readouterr().out
    latents = torch.from_numpy(np.load(out))
    mean = torch.tensor(oracle.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(oracle.config.latents_std).view(1, -1, 1, 1)
    with torch.no_grad():
        pixels = oracle.decode(latents * std + mean).sample
    want = (VaeImageProcessor(vae_scale_factor=8).postprocess(pixels, output_type="np") * 255).round()
    got = np.asarray(Image.open(out.with_suffix(".png")))
    assert got.shape == (64, 128, 3)
    # Rounding to 8 bits can flip a pixel whose float value sits on a boundary; none may be off by more.
    difference = np.abs(got.astype(int) - np.concatenate(list(want), axis=1).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
