"""Models: every registered model runs on kernels only, agrees across engines, trains (finite,
correct gradients) and generates; the captioner's names, mask and config rules are pinned."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from isthmus.data import EOS, PAD, DataSplits, make_dataset
from isthmus.kernels.interface import OPS
from isthmus.kernels.routing import KernelSet
from isthmus.models.captioner.model import TinyCaptioner
from isthmus.nn.layers import prefix_lm_mask
from isthmus.nn.params import initialise
from isthmus.registry.manager import load_plugins

from isthmus.backends.reference.engine import ReferenceEngine
from isthmus.backends.reference.kernels import kernel_table as reference_table
from isthmus.backends.torch.engine import TorchEngine
from isthmus.backends.torch.kernels import kernel_table as torch_table

REPO = Path(__file__).resolve().parents[1]
# The models written against kernels: a model that names the engines it runs on (engines = (...),
# such as the torch-module wrapper of nn.Modules) is engine code by design and has its own tests.
KERNEL_MODELS = [path for path in sorted((REPO / "core" / "models").glob("*/model.py"))
                 if "    engines = (" not in path.read_text()]
MODEL_SOURCES = [REPO / "core" / "nn" / "layers.py", *KERNEL_MODELS]
BUILTIN = load_plugins(autoload=False)[1]
MODEL_NAMES = sorted(name for name, spec in BUILTIN.specs["model"].items()
                     if any(spec.plugin == path.parent.name for path in KERNEL_MODELS))
SEED = 5


# ---- helpers -------------------------------------------------------------------------------------


def default_config(name: str) -> dict[str, Any]:
    """The model's shipped option file ``model/<name>.yaml`` (from its package's config directory)."""
    for directory in BUILTIN.config_dirs:
        file = Path(directory) / "model" / f"{name}.yaml"
        if file.is_file():
            return yaml.safe_load(file.read_text())
    return {"name": name}


@pytest.fixture(scope="module")
def scenes():
    train, _, tokenizer = make_dataset({"num_train": 6, "num_eval": 1, "seed": 3})
    return train, tokenizer


# Models that read data of their own kind rather than scenes: (registered dataset, its options).
OWN_DATA = {"glm-image-dit": ("dit-latents", {"num_train": 6, "num_eval": 1, "grid_rows": 2, "grid_cols": 3,
                                             "codebook_size": 64})}


def data_for(name: str, scenes: tuple[Any, Any]) -> tuple[Any, Any]:
    """``(train split, tokenizer)`` a model reads: the scenes, or its own dataset (:data:`OWN_DATA`)."""
    if name not in OWN_DATA:
        return scenes
    dataset, options = OWN_DATA[name]
    splits = BUILTIN.specs["dataset"][dataset].factory({"name": dataset, **options}, None)
    return splits.train, splits.tokenizer


def build(name: str, tokenizer, **overrides: Any) -> Any:
    spec = BUILTIN.specs["model"][name]
    return spec.factory({**default_config(name), **overrides}, DataSplits([], [], tokenizer=tokenizer))


def reference() -> tuple[KernelSet, ReferenceEngine]:
    engine = ReferenceEngine(seed=0)
    return KernelSet("reference", "numpy", reference_table(engine)), engine


def torch_cpu() -> tuple[KernelSet, TorchEngine]:
    engine = TorchEngine("cpu", seed=0)
    return KernelSet("cpu", "torch", torch_table(engine)), engine


def on(engine: Any, arrays: dict[str, np.ndarray], dtype: str | None = None) -> dict[str, Any]:
    return {name: engine.asarray(array, dtype) for name, array in arrays.items()}


def batch_of(train, count: int = 4, model: Any = None) -> dict[str, np.ndarray]:
    """A batch as ``model`` consumes it (through its ``bind_data``, e.g. with visual codes), without
    the bookkeeping entries no model reads."""
    tokenizer = getattr(train, "tokenizer", None)  # scenes carry theirs; synthetic latents have none
    data = model.bind_data(DataSplits(train, train, tokenizer=tokenizer), SEED, None).train if model else train
    batch = data.batch(list(range(count)))
    return {key: value for key, value in batch.items() if key not in ("indices", "lengths")}


class Sealed:
    """A tensor with no operators, no indexing and no ``.shape``: only kernels can use it."""

    __slots__ = ("value",)
    __array_ufunc__ = None  # numpy refuses to mix it into arithmetic
    __hash__ = None

    def __init__(self, value: Any) -> None:
        self.value = value

    def __bool__(self) -> bool:
        raise TypeError("model code asked for the truth value of a tensor")


def seal(value: Any) -> Any:
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        return Sealed(value)
    if isinstance(value, (list, tuple)):
        return type(value)(seal(v) for v in value)
    return value


def unseal(value: Any) -> Any:
    if isinstance(value, Sealed):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(unseal(v) for v in value)
    return value


def sealed_reference() -> KernelSet:
    """Reference kernels that take and return :class:`Sealed` tensors."""
    table = reference_table(ReferenceEngine(seed=0))

    def wrap(fn):
        def op(*args, **kwargs):
            result = fn(*unseal(list(args)), **{key: unseal(v) for key, v in kwargs.items()})
            return seal(result)
        return op

    return KernelSet("sealed", "numpy", {op: wrap(table[op]) for op in OPS})


# ---- every registered model ----------------------------------------------------------------------


def test_the_captioner_is_registered():
    assert "tiny-captioner" in MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_calls_kernels_only(name, scenes):
    train, tokenizer = data_for(name, scenes)
    model = build(name, tokenizer)
    params = {key: Sealed(value) for key, value in initialise(model.param_specs(), SEED).items()}
    k = sealed_reference()
    loss, metrics = model.loss(k, params, {key: Sealed(v) for key, v in batch_of(train, model=model).items()})
    assert np.isfinite(loss.value) and all(np.isfinite(m.value) for m in metrics.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_and_torch_agree(name, scenes):
    train, tokenizer = data_for(name, scenes)
    model = build(name, tokenizer)
    weights = initialise(model.param_specs(), SEED)
    batch = batch_of(train, model=model)
    outputs = {}
    for label, (k, engine) in {"reference": reference(), "torch": torch_cpu()}.items():
        params, data = engine.parameters(weights), on(engine, batch)
        with engine.no_grad():
            logits = model.forward(k, params, data)
            loss, metrics = model.loss(k, params, data, training=False)
        outputs[label] = (engine.to_numpy(logits), float(loss), {m: float(v) for m, v in metrics.items()})
    (ref_logits, ref_loss, ref_metrics), (logits, loss, metrics) = outputs["reference"], outputs["torch"]
    assert ref_logits.dtype == np.float64 and logits.dtype == np.float32
    scale = max(1.0, float(np.abs(ref_logits).max()))
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4 * scale)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert metrics == pytest.approx(ref_metrics, abs=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_finite_nonzero_gradient(name, scenes):
    train, tokenizer = data_for(name, scenes)
    model = build(name, tokenizer)
    k, engine = torch_cpu()
    params = engine.parameters(initialise(model.param_specs(), SEED))
    data = on(engine, batch_of(train, model=model))
    loss, _, grads = engine.value_and_grad(lambda p: model.loss(k, p, data), params)
    assert math.isfinite(float(loss)) and list(grads) == list(params)
    specs = model.param_specs()
    for key, grad in grads.items():
        assert grad.shape == params[key].shape and torch.isfinite(grad).all(), key
        if specs[key].trainable:
            assert grad.abs().max() > 0, f"{key} does not reach the loss"
        else:  # frozen (a tokenizer whose integer codes the loss reads): exactly no gradient
            assert grad.abs().max() == 0, f"{key} is frozen but gets a gradient"


def test_model_sources_import_no_engine():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|mindspore|numpy|jax|tensorflow)\b", re.MULTILINE)
    assert len(MODEL_SOURCES) >= 3
    for source in MODEL_SOURCES:
        assert not pattern.search(source.read_text()), f"{source.name} imports an engine"


# ---- the captioner -------------------------------------------------------------------------------


def test_gradients_match_finite_differences_in_float64(scenes):
    train, tokenizer = scenes
    model = build("tiny-captioner", tokenizer)
    k, engine = torch_cpu()
    weights = initialise(model.param_specs(), SEED)
    params = engine.parameters(weights, "float64")
    data = on(engine, batch_of(train, 2))
    _, _, grads = engine.value_and_grad(lambda p: model.loss(k, p, data), params)
    probes = [("vision.patch.weight", (3, 1, 2, 5)), ("vision.blocks.0.attn.qkv.weight", (70, 9)),
              ("text.embed.weight", (tokenizer.token_to_id["a"], 4)), ("text.blocks.1.mlp.fc1.bias", (17,)),
              ("text.head.weight", (EOS, 0))]
    step = 1e-6
    for key, index in probes:
        values = []
        for sign in (1.0, -1.0):
            moved = weights[key].astype(np.float64)
            moved[index] += sign * step
            with engine.no_grad():
                shifted = {**params, key: engine.asarray(moved, "float64")}
                values.append(float(model.loss(k, shifted, data)[0]))
        numeric = (values[0] - values[1]) / (2 * step)
        analytic = float(grads[key][index])
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), key


def test_parameter_names_are_stable_dotted_names(scenes):
    _, tokenizer = scenes
    specs = build("tiny-captioner", tokenizer, n_layers_vision=2, n_layers_text=2).param_specs()
    assert list(specs)[:3] == ["vision.patch.weight", "vision.patch.bias", "vision.position.weight"]
    for expected in ("vision.blocks.0.attn.qkv.weight", "vision.blocks.1.mlp.fc2.bias", "vision.norm.weight",
                     "text.embed.weight", "text.blocks.1.attn.proj.weight", "text.blocks.0.norm2.bias",
                     "text.norm.weight", "text.head.weight"):
        assert expected in specs
    assert list(specs)[-1] == "text.head.weight"
    assert all(re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", name) for name in specs)
    no_decay = {name for name, spec in specs.items() if not spec.decay}
    assert no_decay == {name for name in specs if name.endswith(".bias") or ".norm" in name}
    swiglu = build("tiny-captioner", tokenizer, mlp="swiglu", norm="rms").param_specs()
    assert "text.blocks.0.mlp.gate.weight" in swiglu and "text.norm.bias" not in swiglu


def test_swiglu_and_rms_norm_variant_agrees_across_engines(scenes):
    train, tokenizer = scenes
    model = build("tiny-captioner", tokenizer, mlp="swiglu", norm="rms", n_layers_vision=1, n_layers_text=1)
    weights, batch = initialise(model.param_specs(), SEED), batch_of(train, 2)
    results = []
    for k, engine in (reference(), torch_cpu()):
        results.append(engine.to_numpy(model.forward(k, engine.parameters(weights), on(engine, batch))))
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_prefix_lm_mask_values():
    k, _ = reference()
    expected = np.array([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=bool)
    assert np.array_equal(prefix_lm_mask(k, 2, 5), expected)


def test_text_is_causal_and_sees_the_image(scenes):
    train, tokenizer = scenes
    model = build("tiny-captioner", tokenizer)
    k, engine = reference()
    params = engine.parameters(initialise(model.param_specs(), SEED))
    batch = batch_of(train, 2)
    base = model.forward(k, params, on(engine, batch))
    later = 5
    tokens = batch["tokens"].copy()
    tokens[:, later] = tokenizer.token_to_id["purple"]
    changed = model.forward(k, params, on(engine, {**batch, "tokens": tokens}))
    np.testing.assert_array_equal(changed[:, :later], base[:, :later])
    assert not np.allclose(changed[:, later:], base[:, later:])
    images = batch["images"].copy()
    images[:, :, -1, -1] = 1.0  # one pixel in the last patch
    seen = model.forward(k, params, on(engine, {**batch, "images": images}))
    assert np.all(np.abs(seen - base).max(axis=-1) > 0), "some text position does not see the image"


def test_generate_shapes_agree_across_engines_and_match_forward(scenes):
    train, tokenizer = scenes
    model = build("tiny-captioner", tokenizer)
    weights, images = initialise(model.param_specs(), SEED), train.batch([0, 1, 2])["images"]
    generated = []
    for k, engine in (reference(), torch_cpu()):
        with engine.no_grad():
            out = model.caption(k, engine.parameters(weights), engine.asarray(images), max_len=6)
        assert k.shape(out) == (3, 6) and k.dtype(out) == "int64"
        generated.append(engine.to_numpy(out))
    np.testing.assert_array_equal(generated[0], generated[1])
    assert k.shape(model.caption(k, engine.parameters(weights), engine.asarray(images))) == (3, 15)
    # Teacher forcing on the generated tokens predicts them again, up to the first <eos>.
    k, engine = reference()
    tokens = np.concatenate([np.ones((3, 1), np.int64), generated[0]], axis=1)
    logits = model.forward(k, engine.parameters(weights), on(engine, {"images": images, "tokens": tokens}))
    predicted = np.argmax(logits[:, :-1], axis=-1)
    for row, wanted in zip(predicted, generated[0]):
        stop = list(wanted).index(EOS) + 1 if EOS in wanted else len(wanted)
        np.testing.assert_array_equal(row[:stop], wanted[:stop])


def test_generate_pads_after_eos(scenes):
    train, tokenizer = scenes
    model = build("tiny-captioner", tokenizer)
    k, engine = reference()
    scripted = np.array([[5, 6, EOS, 7, 8], [5, 5, 5, 5, 5], [EOS, 9, 9, EOS, 9]])
    vocab = tokenizer.vocab_size

    def decode(k, params, image_tokens, tokens, training=False):
        # Position i scores scripted[:, i] highest, whatever the tokens so far.
        length = k.shape(tokens)[1]
        one_hot = np.eye(vocab)[scripted[:, :length]]
        return k.asarray(one_hot)

    model.decode = decode
    params = engine.parameters(initialise(model.param_specs(), SEED))
    out = model.caption(k, params, engine.asarray(train.batch([0, 1, 2])["images"]), max_len=5)
    assert out.tolist() == [[5, 6, EOS, PAD, PAD], [5, 5, 5, 5, 5], [EOS, PAD, PAD, PAD, PAD]]


def test_config_comes_from_the_tokenizer_and_is_checked():
    model = TinyCaptioner({"name": "tiny-captioner", "vocab_size": None}, vocab_size=20)
    assert model.config.vocab_size == 20 and model.name == "tiny-captioner"
    assert TinyCaptioner({"vocab_size": 30}, vocab_size=20).config.vocab_size == 30
    with pytest.raises(ValueError, match="vocab_size"):
        TinyCaptioner({})
    with pytest.raises(ValueError, match=r"d_model: 60 is not divisible by n_heads \(8\).*patch_size \(5\)"):
        TinyCaptioner({"d_model": 60, "n_heads": 8, "patch_size": 5}, vocab_size=20)
    with pytest.raises(ValueError, match="unknown tiny-captioner option 'depth'"):
        TinyCaptioner({"depth": 3}, vocab_size=20)
