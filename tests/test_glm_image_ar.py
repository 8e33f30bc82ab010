"""GLM-Image's autoregressive stage (``glm-image-ar``) against transformers' ``GlmImageForConditionalGeneration``:
the generator's logits on mixed text and image-token sequences, the image tokenizer's codes, the 3-D
positions, the loss and gradients, and generation with and without the KV cache.

The oracle is transformers 5 (the ``hf`` extra) on the two tiny random configs of
:mod:`glm_image_oracle`, never downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_image_oracle import CONFIGS, canonical, hf_config, hf_model, in_float64, pack
from isthmus.backends.torch.engine import TorchEngine
from isthmus.backends.torch.kernels import kernel_table as torch_table
from isthmus.kernels.routing import KernelSet
from isthmus.models.glm_image_ar import positions
from isthmus.models.glm_image_ar.generation import Sampling, generate
from isthmus.models.glm_image_ar.interop import GLM_IMAGE
from isthmus.models.glm_image_ar.model import GlmImageAR
from isthmus.registry.manager import get_registry
from isthmus.train.restore import build_label

INDICES = range(len(CONFIGS))


def torch_kernels() -> tuple[KernelSet, TorchEngine]:
    engine = TorchEngine("cpu", seed=0)
    return KernelSet("cpu", "torch", torch_table(engine)), engine


def pair(index: int, seed: int = 0, jitter: bool = True) -> tuple[object, GlmImageAR, dict[str, np.ndarray]]:
    """A transformers model, the isthmus model its config maps to, and the weights (float64)."""
    hf = hf_model(index, seed=seed, jitter=jitter)
    section = GLM_IMAGE.model_config(hf_config(hf))
    return hf, GlmImageAR(section), canonical(GLM_IMAGE, section, hf, np.float64)


def mixed_batch(index: int, seed: int = 3) -> dict[str, np.ndarray]:
    """Two rows of image-to-image prompts: text, ``image_start``, a source image's placeholders,
    ``image_end``, text, ``image_start``; the source images (2 x 3 patches) and the grids."""
    top, text = CONFIGS[index]["top"], CONFIGS[index]["text"]
    patch = CONFIGS[index]["vision"]["patch_size"]
    rng = np.random.default_rng(seed)
    words = lambda n: list(rng.integers(text["vision_vocab_size"], text["vocab_size"] - 2, size=n))  # noqa: E731
    rows = []
    for _ in range(2):
        rows.append(words(3) + [top["image_start_token_id"]] + [top["image_token_id"]] * 6
                    + [top["image_end_token_id"]] + words(4) + [top["image_start_token_id"]])
    images = rng.standard_normal((2, 3, 2 * patch, 3 * patch)).astype(np.float32)
    return {"ids": np.array(rows), "images": images, "grids": [(1, 2, 3), (1, 3, 3)]}


def hf_mixed_logits(hf, batch, index: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits for the mixed batch (it tokenizes the source images itself) and its positions."""
    patch = CONFIGS[index]["vision"]["patch_size"]
    grids = torch.tensor(batch["grids"] * 2)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(batch["ids"]), pixel_values=torch.from_numpy(pack(batch["images"], patch)),
                 image_grid_thw=grids, images_per_sample=torch.tensor([2, 2])).logits.numpy()
        at, _ = hf.model.get_rope_index(torch.from_numpy(batch["ids"]), image_grid_thw=grids,
                                        images_per_sample=torch.tensor([2, 2]))
    return out, at.permute(1, 0, 2).numpy()


def isthmus_mixed(model: GlmImageAR, k, engine, params, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same through isthmus: codes of the source images put in the placeholders, 3-D positions
    from :func:`positions.rope_index`, then the generator's logits."""
    c = model.config
    codes = engine.to_numpy(model.image_codes(k, params, engine.asarray(batch["images"])))
    ids = batch["ids"].copy()
    ids[ids == c.image_token_id] = codes.reshape(-1)
    at = np.stack([positions.rope_index(row, batch["grids"], c.image_start_token_id, c.image_end_token_id)[0]
                   for row in ids])
    logits = engine.to_numpy(model.forward(k, params, {"tokens": engine.asarray(ids), "positions": engine.asarray(at)}))
    return logits, at, codes


@pytest.mark.parametrize("index", INDICES)
def test_logits_on_a_mixed_text_and_image_sequence_match_transformers(index):
    hf, model, weights = pair(index, seed=index)
    batch = mixed_batch(index)
    want, want_at = hf_mixed_logits(hf, batch, index)
    k, engine = torch_kernels()
    got, at, _ = isthmus_mixed(model, k, engine, engine.parameters(weights), batch)
    assert np.array_equal(at, want_at)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    assert error <= 1e-5, error


@pytest.mark.parametrize("index", INDICES)
def test_codes_are_those_of_transformers_at_the_table_size_and_resampled(index):
    hf, model, weights = pair(index, seed=index)
    k, engine = torch_kernels()
    params = engine.parameters(weights)
    side, patch = CONFIGS[index]["vision"]["image_size"], CONFIGS[index]["vision"]["patch_size"]
    rng = np.random.default_rng(index)
    for height, width in ((side, side), (2 * patch, 3 * patch), (side + patch, patch)):
        images = rng.standard_normal((3, 3, height, width)).astype(np.float32)
        grid = torch.tensor([[1, height // patch, width // patch]] * 3)
        with torch.no_grad():
            features = hf.model.get_image_features(torch.from_numpy(pack(images, patch)), grid).pooler_output
            want = hf.model.get_image_tokens(features).numpy()
        got = engine.to_numpy(model.image_codes(k, params, engine.asarray(images)))
        assert got.dtype == np.int64 and got.shape == (3, (height // patch) * (width // patch))
        assert np.array_equal(got.reshape(-1), want), (height, width)
        assert len(np.unique(want)) > 1  # not a degenerate codebook: the check can fail


def test_a_wrong_rotary_section_is_caught_by_the_oracle():
    # The same weights with the height and width sections swapped: the check must see it.
    hf, model, weights = pair(0)
    batch = mixed_batch(0)
    want, _ = hf_mixed_logits(hf, batch, 0)
    wrong = GlmImageAR({**model.config.__dict__, "mrope_height": 3, "mrope_width": 3, "mrope_temporal": 2})
    wrong.sections = wrong.sections[::-1].copy()
    k, engine = torch_kernels()
    got, _, _ = isthmus_mixed(wrong, k, engine, engine.parameters(weights), batch)
    assert np.abs(got - want).max() / np.abs(want).max() > 1e-3


@pytest.mark.parametrize("index", INDICES)
def test_positions_of_prompts_and_of_the_images_to_generate_match_transformers(index):
    hf, _, _ = pair(index)
    top = CONFIGS[index]["top"]
    start, end = top["image_start_token_id"], top["image_end_token_id"]
    text_to_image = [5, 6, 7, start]
    image_to_image = [5, start] + [1] * 4 + [end, 6, 7, start]
    for ids, grids in ((text_to_image, [(1, 4, 4), (1, 2, 3)]), (image_to_image, [(1, 2, 2), (1, 3, 5), (1, 2, 2)])):
        with torch.no_grad():
            want, _ = hf.model.get_rope_index(torch.tensor([ids]), image_grid_thw=torch.tensor(grids))
        prompt, decode = positions.rope_index(ids, grids, start, end)
        assert np.array_equal(prompt, want[:, 0].numpy())
        assert np.array_equal(decode, hf.model._cached_decode_position_ids[0].numpy())
    prompt, decode = positions.text_to_image(4, [(2, 3), (4, 4)])
    same = positions.rope_index(text_to_image, [(1, 4, 4), (1, 2, 3)], start, end)
    assert np.array_equal(prompt, same[0]) and np.array_equal(decode, same[1])


@pytest.mark.parametrize("index", INDICES)
def test_float64_logits_loss_and_gradients_match_transformers(index):
    hf, model, weights = pair(index, seed=index)
    batch = mixed_batch(index)
    k, engine = torch_kernels()
    _, at, codes = isthmus_mixed(model, k, engine, engine.parameters(weights), batch)
    ids = batch["ids"].copy()
    ids[ids == model.config.image_token_id] = codes.reshape(-1)
    targets = np.full_like(ids, -100)
    targets[:, :-1] = np.where(ids[:, 1:] < model.config.vision_vocab_size, ids[:, 1:], -100)
    for dtype, tolerance in (("float32", 1e-5), ("float64", 1e-10)):
        params = engine.parameters(weights, dtype)
        feeds = {"tokens": engine.asarray(ids), "positions": engine.asarray(at), "targets": engine.asarray(targets)}
        logits = engine.to_numpy(model.forward(k, params, feeds))
        loss, _, grads = engine.value_and_grad(lambda p: model.loss(k, p, feeds), params)
        hf.zero_grad()
        context = in_float64(hf) if dtype == "float64" else torch.enable_grad()
        with context:
            out = hf(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(at).permute(1, 0, 2)).logits
            # transformers' own labels= loss views the logits with the text vocabulary's width, which
            # is not theirs (they score the vision vocabulary): the cross-entropy is taken directly.
            want = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.from_numpy(targets).reshape(-1))
            want.backward()
            hf_grads = {n: p.grad.detach().to(torch.float64).numpy() for n, p in hf.named_parameters()
                        if p.grad is not None}  # read inside: leaving in_float64 casts them back to float32
        reference = out.detach().to(torch.float64).numpy()
        assert np.abs(logits - reference).max() <= tolerance * np.abs(reference).max(), dtype
        assert float(loss) == pytest.approx(float(want.detach()), rel=tolerance, abs=0), dtype
        scale = max(float(np.abs(g).max()) for g in hf_grads.values())
        for rule in GLM_IMAGE.rules(model_section(model)):
            if rule.foreign not in hf_grads:
                assert all(not np.any(engine.to_numpy(grads[n])) for n in rule.canonical), rule.foreign
                continue
            for name, part in zip(rule.canonical, np.split(hf_grads[rule.foreign], len(rule.canonical))):
                error = float(np.abs(engine.to_numpy(grads[name]) - part).max())
                assert error <= tolerance * scale, (dtype, name, error / scale)


def model_section(model: GlmImageAR) -> dict:
    return dict(model.config.__dict__)


@pytest.mark.parametrize("index", INDICES)
def test_greedy_image_tokens_equal_transformers_generate_with_and_without_the_cache(index):
    hf, model, _ = pair(index, seed=index)
    with torch.no_grad():  # larger generator weights, so the greedy tokens vary
        for name, parameter in hf.named_parameters():
            if name.startswith(("model.language_model", "lm_head")) and name.endswith("weight") and "norm" not in name:
                parameter.mul_(10.0)
    section = GLM_IMAGE.model_config(hf_config(hf))
    weights = canonical(GLM_IMAGE, section, hf)
    top = CONFIGS[index]["top"]
    prompt = np.array([[CONFIGS[index]["text"]["vision_vocab_size"] + 3, 200, 201, top["image_start_token_id"]]])
    grids = [(2, 2), (3, 3)]  # generated in this order; transformers lists them last first
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt), image_grid_thw=torch.tensor([[1, 3, 3], [1, 2, 2]]),
                          max_new_tokens=13, do_sample=False)
    want = out[:, prompt.shape[1]:].numpy()
    assert len(np.unique(want)) > 2
    backend = build_label(get_registry(), "cpu")
    params = backend.engine.parameters(weights)
    for cached in (True, False):
        assert np.array_equal(generate(model, backend, params, prompt, grids, use_cache=cached), want), cached
    on_device = model.generate(backend.kernels, params, {"tokens": backend.engine.asarray(prompt)}, grids=grids)
    assert np.array_equal(backend.engine.to_numpy(on_device), want)


def test_sampled_codes_are_reproducible_and_stay_in_the_codebook():
    _, model, weights = pair(0)
    backend = build_label(get_registry(), "cpu")
    params = backend.engine.parameters(weights)
    prompt = np.array([[200, 201, 150], [210, 211, 150]])
    sampling = Sampling(temperature=1.5, top_k=50, seed=4)
    first = generate(model, backend, params, prompt, [(3, 3)], sampling, codes_only=True)
    again = generate(model, backend, params, prompt, [(3, 3)], sampling, codes_only=True)
    assert np.array_equal(first, again) and first.shape == (2, 9)
    assert first.max() < model.config.vq_num_embeddings and len(np.unique(first)) > 1
    cached = generate(model, backend, params, prompt, [(3, 3)], sampling, use_cache=False, codes_only=True)
    assert np.array_equal(first, cached)


def test_config_rules_name_the_key():
    base = GLM_IMAGE.model_config(hf_config(hf_model(0, jitter=False)))
    for change, key in (({"mrope_width": 4}, "mrope_temporal"), ({"image_start_token_id": 3}, "image_start_token_id"),
                        ({"vq_num_embeddings": 170}, "vq_num_embeddings"), ({"image_size": 36}, "image_size"),
                        ({"num_key_value_heads": 3}, "num_key_value_heads")):
        with pytest.raises(ValueError, match=key):
            GlmImageAR({**base, **change})


def test_code_vectors_are_the_quantizers_output_for_the_codes():
    hf, model, weights = pair(1, seed=1)
    k, engine = torch_kernels()
    params = engine.parameters(weights)
    images = np.random.default_rng(2).standard_normal((2, 3, 48, 48)).astype(np.float32)
    codes = model.image_codes(k, params, engine.asarray(images))
    got = engine.to_numpy(model.code_vectors(k, params, codes))  # (B, N, embed_dim)
    with torch.no_grad():
        features = hf.model.get_image_features(torch.from_numpy(pack(images, 8)), torch.tensor([[1, 6, 6]] * 2))
        want = np.stack([hf.model.vqmodel.encode(f[None]).quantized_last_hidden_state[0].numpy()
                         for f in features.pooler_output])  # (B, embed_dim, 6, 6)
    want = want.reshape(2, want.shape[1], -1).transpose(0, 2, 1)
    assert np.abs(got - want).max() <= 1e-6


def test_a_frozen_parameter_takes_no_weight_decay():
    from isthmus.nn.params import ParamSpec

    with pytest.raises(ValueError, match="decay=False"):
        ParamSpec((2, 2), trainable=False)
    _, model, _ = pair(0, jitter=False)
    frozen = {name for name, spec in model.param_specs().items() if not spec.trainable}
    assert frozen == {name for name in model.param_specs() if name.startswith(("vision.", "vq."))}
