"""GLM-Image's DiT registers itself like any plugin: the model (and its diffusers checkpoint layout),
the synthetic ``dit-latents`` dataset it trains on here, and its config files. Importing this
module imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import DatasetSpec, ModelSpec

NAME = "glm-image-dit"
# A few-second run (tests, the conformance kit, `isthmus selftest`).
SMOKE = ("model.num_layers=1", "data.num_train=16", "data.num_eval=4", "data.grid_rows=2", "data.grid_cols=2")
# The data keys that must equal the model's (data key, model key).
MATCHED = (("latent_channels", "in_channels"), ("patch_size", "patch_size"), ("text_embed_dim", "text_embed_dim"),
           ("codebook_size", "prior_vq_quantizer_codebook_size"))


def build(model_config: Mapping[str, Any], data: Any) -> Any:
    """The DiT from its config section; data that says its sizes (``dit-latents``) must match them."""
    from isthmus.errors import IsthmusError
    from isthmus.models.glm_image_dit.model import GlmImageDit

    model = GlmImageDit(model_config)
    info = data.info or {}
    for data_key, model_key in MATCHED:
        if data_key in info and info[data_key] != getattr(model.config, model_key):
            raise IsthmusError(f"data.{data_key}={info[data_key]} but model.{model_key}="
                               f"{getattr(model.config, model_key)}: the latents must fit the model; set them equal")
    return model


def dit_latents(data_config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> Any:
    """Synthetic flow-matching samples (:func:`isthmus.models.glm_image_dit.data.dit_latents`)."""
    from isthmus.models.glm_image_dit.data import dit_latents as make

    return make(data_config, saved)


@hookimpl
def register_models(register):
    register(ModelSpec(name=NAME, factory=build, schema="isthmus.models.glm_image_dit.config:GlmImageDitConfig",
                       smoke=SMOKE, description="GLM-Image's DiT decoder (diffusers GlmImageTransformer2DModel): "
                                                "flow matching over latents, conditioned on prior image tokens and text",
                       formats={"hf": "isthmus.models.glm_image_dit.interop:GLM_IMAGE_DIT"}))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(name="dit-latents", factory=dit_latents,
                         schema="isthmus.models.glm_image_dit.data:DitLatentsConfig",
                         description="Synthetic latents, prior tokens and text embeddings for GLM-Image's DiT"))


@hookimpl
def register_config_dirs():
    return Path(__file__).parent / "configs"


def _configure(parser: Any) -> None:
    from isthmus.models.glm_image_dit.commands import configure

    configure(parser)


def _run(args: Any) -> int:
    from isthmus.models.glm_image_dit.commands import run

    return run(args)


@hookimpl
def register_commands(register):
    from isthmus.registry.specs import CommandSpec

    register(CommandSpec(name="generate", help="latents from prior tokens (or a prompt through a generator "
                                               "checkpoint) with a GLM-Image DiT checkpoint",
                         configure=_configure, run=_run, models=(NAME,)))
