"""The decoder family (llama, qwen2, glm4) against transformers, its generation and sampling.

The oracle is transformers 5 (the ``hf`` extra) on tiny random configs built here, never downloaded.
The fast tier checks one config per preset and one generation; the slow tier checks three configs
per preset (odd sizes, GQA ratios 1, 2 and 4, head_dim apart from the width, partial rotary, tied and
untied heads, biases, rope scaling), loss and gradients in float32 and float64, and 32 greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_oracle import canonical, hf_config, hf_model, in_float64, targets_of
from isthmus.backends.reference.engine import ReferenceEngine
from isthmus.backends.reference.kernels import kernel_table as reference_table
from isthmus.backends.torch.engine import TorchEngine
from isthmus.backends.torch.kernels import kernel_table as torch_table
from isthmus.kernels.routing import KernelSet
from isthmus.models.decoder_lm import interop
from isthmus.models.decoder_lm.generation import Sampling, choose, generate
from isthmus.models.decoder_lm.model import DecoderLM
from isthmus.registry.manager import load_plugins
from isthmus.train.restore import build_label

LAYOUTS = {"llama": interop.LLAMA, "qwen2": interop.QWEN2, "glm4": interop.GLM4}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    # GQA ratio 1 with head_dim apart from the width; ratio 2 with biases and scaled rope; ratio 4.
    "llama": [
        dict(vocab_size=301, hidden_size=42, intermediate_size=67, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=6, head_dim=8, tie_word_embeddings=False),
        dict(vocab_size=263, hidden_size=48, intermediate_size=61, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
             rope_parameters=LLAMA3),
        dict(vocab_size=300, hidden_size=64, intermediate_size=91, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, tie_word_embeddings=False,
             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ],
    "qwen2": [
        dict(vocab_size=301, hidden_size=42, intermediate_size=67, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=3, head_dim=8, tie_word_embeddings=True),
        dict(vocab_size=263, hidden_size=48, intermediate_size=61, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1000000.0}),
        dict(vocab_size=300, hidden_size=64, intermediate_size=91, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, tie_word_embeddings=True,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 16}),
    ],
    "glm4": [
        dict(vocab_size=301, hidden_size=42, intermediate_size=67, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=6, head_dim=8, tie_word_embeddings=False),
        dict(vocab_size=263, hidden_size=48, intermediate_size=61, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, attention_bias=False),
        dict(vocab_size=300, hidden_size=64, intermediate_size=91, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    ],
}
SEQ = 40  # past the scaled configs' original context (16), so the scaling matters


def torch_kernels(dtype: str = "float32") -> tuple[KernelSet, TorchEngine]:
    engine = TorchEngine("cpu", seed=0)
    return KernelSet("cpu", "torch", torch_table(engine)), engine


def pair(kind: str, config: dict, seed: int = 0) -> tuple[object, DecoderLM, dict[str, np.ndarray]]:
    """A transformers model, the isthmus model its config maps to, and the weights (float64)."""
    hf = hf_model(kind, seed=seed, **config)
    section = LAYOUTS[kind].model_config(hf_config(hf))
    return hf, DecoderLM(section), canonical(LAYOUTS[kind], section, hf, np.float64)


def token_ids(vocab: int, rows: int = 2, length: int = SEQ, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, length))


def logits_error(kind: str, config: dict, seed: int = 0) -> float:
    """max |isthmus - transformers| / max |transformers| of the logits, torch CPU float32."""
    hf, model, weights = pair(kind, config, seed)
    k, engine = torch_kernels()
    ids = token_ids(config["vocab_size"])
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
        got = engine.to_numpy(model.forward(k, engine.parameters(weights), {"tokens": engine.asarray(ids)}))
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_each_preset_matches_transformers(kind):
    assert logits_error(kind, CONFIGS[kind][0]) <= 1e-5


def test_a_wrong_layout_is_caught_by_the_oracle():
    # The same weights with GLM-4's rotary pairs read as Llama's half split: the check must see it.
    hf, model, weights = pair("glm4", CONFIGS["glm4"][0])
    wrong = DecoderLM({**model.config.__dict__, "rope_interleaved": False})
    k, engine = torch_kernels()
    ids = token_ids(301)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
        got = engine.to_numpy(wrong.forward(k, engine.parameters(weights), {"tokens": engine.asarray(ids)}))
    assert np.abs(got - want).max() / np.abs(want).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind, index", [(k, i) for k in sorted(CONFIGS) for i in range(3)])
def test_three_configs_per_preset_match_transformers_in_logits_loss_and_gradients(kind, index):
    config = CONFIGS[kind][index]
    assert logits_error(kind, config, seed=index) <= 1e-5
    hf, model, weights = pair(kind, config, seed=index)
    ids = token_ids(config["vocab_size"], seed=index + 7)
    targets = targets_of(ids)
    layout = LAYOUTS[kind]
    section = layout.model_config(hf_config(hf))
    dtypes = ["float32"] + (["float64"] if hf.config.rope_parameters["rope_type"] == "default" else [])
    for dtype in dtypes:
        tolerance = 1e-4 if dtype == "float32" else 1e-10
        k, engine = torch_kernels()
        params = engine.parameters(weights, dtype)
        batch = {"tokens": engine.asarray(ids), "targets": engine.asarray(targets)}
        loss, _, grads = engine.value_and_grad(lambda p: model.loss(k, p, batch), params)
        hf.zero_grad()
        if dtype == "float64":
            with in_float64(hf):
                logits = hf(torch.from_numpy(ids)).logits
                want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         torch.from_numpy(ids[:, 1:]).reshape(-1))
                want.backward()
                hf_grads = canonical_grads(layout, section, hf)
        else:
            want = hf(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
            want.backward()
            hf_grads = canonical_grads(layout, section, hf)
        assert float(loss) == pytest.approx(float(want.detach()), rel=tolerance, abs=0), dtype
        scale = max(float(np.abs(g).max()) for g in hf_grads.values())
        for name, grad in grads.items():
            error = float(np.abs(engine.to_numpy(grad) - hf_grads[name]).max())
            assert error <= tolerance * scale, (dtype, name, error / scale)


def canonical_grads(layout, section, hf) -> dict[str, np.ndarray]:
    grads = {name: p.grad.detach().to(torch.float64).numpy() for name, p in hf.named_parameters()}
    if hf.config.tie_word_embeddings:
        grads.pop("lm_head.weight", None)  # the same tensor as the embedding: its gradient is counted there
    out = {}
    for rule in layout.rules(section):
        for name, part in zip(rule.canonical, np.split(grads[rule.foreign], len(rule.canonical), axis=rule.axis)):
            out[name] = part
    return out


def test_rope_scaling_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from isthmus.models.decoder_lm import rope
    from isthmus.models.decoder_lm.config import DecoderConfig

    for kind, index in (("llama", 1), ("llama", 2), ("qwen2", 2)):
        hf = hf_model(kind, **CONFIGS[kind][index])
        params = hf.config.rope_parameters
        want, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf.config)
        section = LAYOUTS[kind].model_config(hf_config(hf))
        c = DecoderConfig(**{k: v for k, v in section.items() if k != "name"})
        np.testing.assert_allclose(rope.inverse_frequencies(c), want.numpy(), rtol=2e-6, err_msg=params["rope_type"])
        assert rope.attention_factor(c) == pytest.approx(scale, rel=1e-12)


# ---- generation ----------------------------------------------------------------------------------


def greedy_case(kind: str, index: int, new: int) -> None:
    # Wider initial weights than the families' 0.02: tiny models that small repeat one token forever.
    hf, model, weights = pair(kind, {**CONFIGS[kind][index], "initializer_range": 0.3}, seed=index)
    registry = load_plugins(autoload=False)[1]
    backend = build_label(registry, "cpu")
    params = backend.engine.parameters(weights)
    prompt = token_ids(CONFIGS[kind][index]["vocab_size"], rows=2, length=5, seed=3)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones_like(torch.from_numpy(prompt)))
    want = want[:, prompt.shape[1]:].numpy()
    cached = generate(model, backend, params, prompt, new, use_cache=True)
    uncached = generate(model, backend, params, prompt, new, use_cache=False)
    np.testing.assert_array_equal(cached, want)
    np.testing.assert_array_equal(uncached, want)
    assert len(set(want.ravel().tolist())) > 1, "a generation of one repeated token proves little"


def test_greedy_generation_equals_transformers_with_and_without_the_cache():
    greedy_case("glm4", 1, 8)


@pytest.mark.slow
@pytest.mark.parametrize("kind, index", [(k, i) for k in sorted(CONFIGS) for i in range(3)])
def test_32_greedy_tokens_equal_transformers_generate(kind, index):
    greedy_case(kind, index, 32)


def test_cached_steps_in_chunks_equal_the_forward_in_float64():
    _, model, weights = pair("llama", CONFIGS["llama"][1])
    engine = ReferenceEngine(seed=0)
    k = KernelSet("reference", "numpy", reference_table(engine))
    ids = token_ids(263, rows=2, length=9)
    whole = model.forward(k, weights, {"tokens": ids})
    cache = model.empty_cache(k, 2, 12, "float64")
    first, cache = model.step(k, weights, ids[:, :5], np.zeros((2, 1), np.int64), cache)
    pieces = [first]
    for at in range(5, 9):
        logits, cache = model.step(k, weights, ids[:, at:at + 1], np.full((2, 1), at, np.int64), cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0, atol=1e-12)


def test_generate_on_the_device_equals_the_host_loop():
    _, model, weights = pair("qwen2", CONFIGS["qwen2"][0])
    registry = load_plugins(autoload=False)[1]
    backend = build_label(registry, "cpu")
    params = backend.engine.parameters(weights)
    prompt = token_ids(301, rows=2, length=4)
    host = generate(model, backend, params, prompt, 6)
    with backend.engine.no_grad():
        for use_cache in (True, False):
            device = model.generate(backend.kernels, params, {"tokens": backend.engine.asarray(prompt)}, 6,
                                    use_cache=use_cache)
            np.testing.assert_array_equal(backend.engine.to_numpy(device), host)


def test_generation_stops_rows_at_eos_and_pads_after():
    _, model, weights = pair("llama", CONFIGS["llama"][0])
    registry = load_plugins(autoload=False)[1]
    backend = build_label(registry, "cpu")
    params = backend.engine.parameters(weights)
    prompt = token_ids(301, rows=3, length=4)
    free = generate(model, backend, params, prompt, 8)
    eos = int(free[0, 2])  # the first row's third token: it must stop there
    stopped = generate(model, backend, params, prompt, 8, eos_id=eos, pad_id=-7)
    row = list(stopped[0])
    assert row[:3] == list(free[0, :3]) and row[3:] == [-7] * 5
    for got, want in zip(stopped[1:], free[1:]):
        hit = list(want).index(eos) + 1 if eos in want else len(want)
        assert list(got[:hit]) == list(want[:hit]) and all(t == -7 for t in got[hit:])


# ---- sampling -----------------------------------------------------------------------------------


def test_choice_greedy_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    rng = np.random.default_rng(0)
    assert choose(logits, Sampling(), rng).tolist() == [0, 3]
    assert choose(logits, Sampling(temperature=1.0, top_k=1), rng).tolist() == [0, 3]
    assert choose(logits, Sampling(temperature=1.0, top_p=0.4), rng).tolist() == [0, 3]
    draws = np.array([choose(logits, Sampling(temperature=1.0, top_p=0.75, seed=0), rng) for _ in range(4000)])
    # top_p 0.75 keeps {0.5, 0.3} (0.5 alone is below 0.75): renormalised 0.625 / 0.375.
    assert set(draws[:, 0]) == {0, 1} and set(draws[:, 1]) == {3, 2}
    assert np.mean(draws[:, 0] == 0) == pytest.approx(0.625, abs=0.03)
    draws = np.array([choose(logits, Sampling(temperature=1.0, top_k=3), rng) for _ in range(4000)])
    assert set(draws[:, 0]) == {0, 1, 2}
    assert np.mean(draws[:, 0] == 2) == pytest.approx(0.15 / 0.95, abs=0.03)
    hot = np.array([choose(logits, Sampling(temperature=100.0), rng) for _ in range(4000)])
    assert np.mean(hot[:, 0] == 3) == pytest.approx(0.25, abs=0.04)  # a high temperature flattens it
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_sampled_generation_is_reproducible_by_seed():
    _, model, weights = pair("glm4", CONFIGS["glm4"][0])
    registry = load_plugins(autoload=False)[1]
    backend = build_label(registry, "cpu")
    params = backend.engine.parameters(weights)
    prompt = token_ids(301, rows=2, length=3)
    first = generate(model, backend, params, prompt, 6, Sampling(1.0, 20, 0.9, seed=4))
    assert np.array_equal(first, generate(model, backend, params, prompt, 6, Sampling(1.0, 20, 0.9, seed=4)))
    assert not np.array_equal(first, generate(model, backend, params, prompt, 6, Sampling(1.0, 20, 0.9, seed=5)))


# ---- config ---------------------------------------------------------------------------------------


def test_config_rules_name_the_key():
    with pytest.raises(ValueError, match=r"num_key_value_heads: num_attention_heads \(4\) is not a multiple of 3"):
        DecoderLM({"name": "llama", "num_attention_heads": 4, "num_key_value_heads": 3}, vocab_size=10)
    with pytest.raises(ValueError, match="partial_rotary_factor: rotates 3 of the 16"):
        DecoderLM({"name": "glm4", "partial_rotary_factor": 0.1875}, vocab_size=10)
    with pytest.raises(ValueError, match="'mistral' is not a decoder preset"):
        DecoderLM({"name": "mistral"}, vocab_size=10)
    assert DecoderLM({"name": "qwen2", "head_dim": 24}, vocab_size=10).param_specs()["layers.0.attn.q.weight"].shape \
        == (96, 64)
