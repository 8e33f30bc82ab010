"""The diffusers layout of GLM-Image's DiT: ``config.json`` (``_class_name``
``GlmImageTransformer2DModel``) and ``diffusion_pytorch_model.safetensors`` (or its shards and
``diffusion_pytorch_model.safetensors.index.json``), as ``save_pretrained`` writes them.

Tensor names: ``image_projector.proj`` (our ``patch``), ``glyph_projector.net.{0.proj,2}``
(``glyph.{fc1,fc2}``), ``prior_token_embedding``, ``prior_projector.net.{0.proj,2}``,
``time_condition_embed.{timestep_embedder,condition_embedder}.linear_{1,2}`` (``time``,
``condition``), per block ``norm1.linear`` (``ada``), ``attn1.to_{q,k,v}`` and ``attn1.to_out.0``,
``ff.net.{0.proj,2}``, then ``norm_out.linear`` (``out_ada``) and ``proj_out`` (``out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from isthmus.interop.layout import LayoutError, Rule
from isthmus.models.glm_image_dit.config import NAME

CLASS = "GlmImageTransformer2DModel"
KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
        "text_embed_dim", "time_embed_dim", "condition_dim", "prior_vq_quantizer_codebook_size")
# The diffusers class's defaults, for keys a config.json leaves out.
DEFAULTS = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 30, "attention_head_dim": 40,
            "num_attention_heads": 64, "text_embed_dim": 1472, "time_embed_dim": 512, "condition_dim": 256,
            "prior_vq_quantizer_codebook_size": 16384}
DIFFUSERS_VERSION = "0.42.1"

# (foreign prefix, canonical prefix), each with a weight and a bias.
FIXED_HEAD = (("image_projector.proj", "patch"), ("glyph_projector.net.0.proj", "glyph.fc1"),
              ("glyph_projector.net.2", "glyph.fc2"))
FIXED_PRIOR = (("prior_projector.net.0.proj", "prior.fc1"), ("prior_projector.net.2", "prior.fc2"),
               ("time_condition_embed.timestep_embedder.linear_1", "time.fc1"),
               ("time_condition_embed.timestep_embedder.linear_2", "time.fc2"),
               ("time_condition_embed.condition_embedder.linear_1", "condition.fc1"),
               ("time_condition_embed.condition_embedder.linear_2", "condition.fc2"))
BLOCK = (("norm1.linear", "ada"), ("attn1.to_q", "attn.q"), ("attn1.to_k", "attn.k"), ("attn1.to_v", "attn.v"),
         ("attn1.to_out.0", "attn.o"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"))
TAIL = (("norm_out.linear", "out_ada"), ("proj_out", "out"))


@dataclass(frozen=True)
class DiffusersDit:
    """The diffusers layout of ``glm-image-dit``."""

    model: str = NAME
    architecture: str = CLASS
    weights_name: str = "diffusion_pytorch_model"

    def model_config(self, foreign: Mapping[str, Any]) -> dict[str, Any]:
        """The ``model`` section for a diffusers ``config.json``."""
        if foreign.get("_class_name") != CLASS:
            raise LayoutError(f"config.json _class_name {foreign.get('_class_name')!r} is not {CLASS!r}")
        section: dict[str, Any] = {"name": NAME}
        for key in KEYS:
            value = foreign.get(key, DEFAULTS[key])
            if not isinstance(value, int) or isinstance(value, bool):
                raise LayoutError(f"config.json {key} is {value!r}; expected an integer")
            section[key] = value
        return section

    def foreign_config(self, model: Mapping[str, Any], original: Mapping[str, Any] | None, dtype: str) -> dict[str, Any]:
        """``config.json``: ``original`` when it maps to the same section (a round trip), else written
        from the section. diffusers keeps no dtype in it."""
        section = {key: int(model[key]) for key in KEYS}
        if original is not None:
            try:
                same = {k: v for k, v in self.model_config(original).items() if k != "name"} == section
            except LayoutError:
                same = False
            if same:
                return dict(original)
        return {"_class_name": CLASS, "_diffusers_version": DIFFUSERS_VERSION, **section}

    def rules(self, model: Mapping[str, Any]) -> list[Rule]:
        """Every diffusers tensor, in the order ``state_dict`` lists them."""
        def pair(foreign: str, canonical: str) -> list[Rule]:
            return [Rule(f"{foreign}.{kind}", (f"{canonical}.{kind}",)) for kind in ("weight", "bias")]

        rules: list[Rule] = []
        for foreign, canonical in FIXED_HEAD:
            rules += pair(foreign, canonical)
        rules.append(Rule("prior_token_embedding.weight", ("prior_embed.weight",)))
        for foreign, canonical in FIXED_PRIOR:
            rules += pair(foreign, canonical)
        for i in range(int(model["num_layers"])):
            for foreign, canonical in BLOCK:
                rules += pair(f"transformer_blocks.{i}.{foreign}", f"blocks.{i}.{canonical}")
        for foreign, canonical in TAIL:
            rules += pair(foreign, canonical)
        return rules

    def data_overrides(self, model: Mapping[str, Any]) -> list[str]:
        """Synthetic latents (``data=dit-latents``) of the model's sizes."""
        return ["data=dit-latents", f"data.latent_channels={int(model['in_channels'])}",
                f"data.patch_size={int(model['patch_size'])}", f"data.text_embed_dim={int(model['text_embed_dim'])}",
                f"data.codebook_size={int(model['prior_vq_quantizer_codebook_size'])}"]

    def ignored(self, foreign_name: str, model: Mapping[str, Any]) -> bool:
        """diffusers saves no buffers for this class: nothing is skipped."""
        return False


GLM_IMAGE_DIT = DiffusersDit()

__all__ = ["CLASS", "DiffusersDit", "GLM_IMAGE_DIT"]
