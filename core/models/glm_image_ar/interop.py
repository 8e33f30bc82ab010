"""The Hugging Face layout of GLM-Image's autoregressive stage: transformers'
``GlmImageForConditionalGeneration`` (``model_type: glm_image``), whose ``config.json`` nests a
``text_config``, a ``vision_config`` and a ``vq_config``.

Tensors: ``model.language_model.*`` is the GLM-4 layout under that prefix (``embed_tokens``, per layer
``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_self_attn_layernorm``,
``post_attention_layernorm``, ``mlp.gate_up_proj`` (gate rows first), ``mlp.down_proj``,
``post_mlp_layernorm``, then ``norm``); ``lm_head`` scores the vision vocabulary;
``model.visual.*`` is the vision encoder and ``model.vqmodel.*`` the quantizer, named as ours.
"""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.interop.layout import LayoutError, Rule

TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vision_vocab_size")
VISION = ("depth", "hidden_size", "num_heads", "intermediate_size", "image_size", "patch_size")
VQ = ("embed_dim", "num_embeddings", "latent_channels")
FLOATS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "vision_layer_norm_eps", "initializer_range")


def _integers(part: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        value = part.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LayoutError(f"config.json {where}.{key} is missing or not an integer; a glm_image config needs "
                              f"{', '.join(keys)} there")


def _single(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if len(value) == 1 else None
    return None if value is None else int(value)


class HfGlmImage:
    """The Hugging Face layout of ``glm-image-ar``."""

    model = "glm-image-ar"
    architecture = "glm_image"
    class_name = "GlmImageForConditionalGeneration"

    # ---- config --------------------------------------------------------------------------
    def model_config(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """The ``model`` section for a ``config.json`` of this architecture."""
        if hf.get("model_type") != self.architecture:
            raise LayoutError(f"config.json model_type {hf.get('model_type')!r} is not {self.architecture!r}")
        parts = {}
        for key in ("text_config", "vision_config", "vq_config"):
            if not isinstance(hf.get(key), Mapping):
                raise LayoutError(f"config.json lacks {key} (an object)")
            parts[key] = hf[key]
        text, vision, vq = parts["text_config"], parts["vision_config"], parts["vq_config"]
        _integers(text, TEXT, "text_config")
        _integers(vision, VISION, "vision_config")
        _integers(vq, VQ, "vq_config")
        for where, part, act in (("text_config", text, "silu"), ("vision_config", vision, "gelu")):
            if part.get("hidden_act", act) != act:
                raise LayoutError(f"config.json {where}.hidden_act {part.get('hidden_act')!r}: GLM-Image's layout runs "
                                  f"{act} there")
            if float(part.get("attention_dropout") or 0.0) != 0.0:
                raise LayoutError(f"config.json {where}.attention_dropout {part['attention_dropout']}: isthmus runs "
                                  f"attention without dropout; set it to 0.0")
        if int(vision.get("spatial_merge_size", 1)) != 1:
            raise LayoutError(f"config.json vision_config.spatial_merge_size {vision['spatial_merge_size']}: "
                              f"only 1 is supported")
        if vq["latent_channels"] != vision["hidden_size"]:
            raise LayoutError(f"config.json vq_config.latent_channels {vq['latent_channels']} must equal "
                              f"vision_config.hidden_size ({vision['hidden_size']}): the quantizer reads its features")
        if text.get("head_dim") not in (None, text["hidden_size"] // text["num_attention_heads"]):
            raise LayoutError(f"config.json text_config.head_dim {text['head_dim']}: GLM-Image's text attention uses "
                              f"hidden_size / num_attention_heads")
        if hf.get("tie_word_embeddings"):
            raise LayoutError("config.json tie_word_embeddings: GLM-Image's head scores the vision vocabulary and "
                              "cannot share the embedding table")
        rope = text.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise LayoutError(f"config.json text_config.rope_parameters.rope_type {rope.get('rope_type')!r}: "
                              f"GLM-Image runs the default rope")
        sections = list(rope.get("mrope_section") or [8, 12, 12])
        if len(sections) != 3:
            raise LayoutError(f"config.json text_config.rope_parameters.mrope_section {sections}: "
                              f"three sections (temporal, height, width) are supported")
        heads = text["num_attention_heads"]
        return {
            "name": self.model,
            "vocab_size": text["vocab_size"],
            "vision_vocab_size": text["vision_vocab_size"],
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": text["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": text.get("num_key_value_heads") or heads,
            "max_position_embeddings": text.get("max_position_embeddings") or 131072,
            "rms_norm_eps": float(text.get("rms_norm_eps") or 1e-5),
            "rope_theta": float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            "partial_rotary_factor": float(rope.get("partial_rotary_factor", 1.0)),
            "mrope_temporal": int(sections[0]),
            "mrope_height": int(sections[1]),
            "mrope_width": int(sections[2]),
            "attention_bias": bool(text.get("attention_bias", True)),
            "pad_token_id": _single(text.get("pad_token_id")),
            "image_start_token_id": int(hf.get("image_start_token_id", 16384)),
            "image_end_token_id": int(hf.get("image_end_token_id", 16385)),
            "image_token_id": _single(hf.get("image_token_id")),
            "vision_depth": vision["depth"],
            "vision_hidden_size": vision["hidden_size"],
            "vision_num_heads": vision["num_heads"],
            "vision_intermediate_size": vision["intermediate_size"],
            "vision_image_size": vision["image_size"],
            "vision_patch_size": vision["patch_size"],
            "vision_in_channels": int(vision.get("in_channels", 3)),
            "vision_layer_norm_eps": float(vision.get("layer_norm_eps") or 1e-6),
            "vision_attention_bias": bool(vision.get("attention_bias", True)),
            "vq_embed_dim": vq["embed_dim"],
            "vq_num_embeddings": vq["num_embeddings"],
            "image_size": vision["image_size"],
            "initializer_range": float(text.get("initializer_range") or 0.02),
        }

    def foreign_config(self, model: Mapping[str, Any], original: Mapping[str, Any] | None, dtype: str) -> dict[str, Any]:
        """``config.json`` for a ``model`` section: ``original`` with its dtype updated when it maps
        to the same section (a round trip), else written from the section."""
        if original is not None:
            try:
                same = _comparable(self.model_config(original)) == _comparable(model)
            except LayoutError:
                same = False
            if same:
                config = dict(original)
                config["dtype"] = dtype
                return config
        c = dict(model)
        vocab = int(c["vocab_size"])
        pad = c.get("pad_token_id")
        return {
            "architectures": [self.class_name],
            "model_type": self.architecture,
            "dtype": dtype,
            "image_start_token_id": int(c["image_start_token_id"]),
            "image_end_token_id": int(c["image_end_token_id"]),
            "image_token_id": int(c["image_token_id"]) if c.get("image_token_id") is not None else vocab - 2,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "glm_image_text",
                "vocab_size": vocab,
                "vision_vocab_size": int(c["vision_vocab_size"]),
                "hidden_size": int(c["hidden_size"]),
                "intermediate_size": int(c["intermediate_size"]),
                "num_hidden_layers": int(c["num_hidden_layers"]),
                "num_attention_heads": int(c["num_attention_heads"]),
                "num_key_value_heads": int(c["num_key_value_heads"]),
                "hidden_act": "silu",
                "max_position_embeddings": int(c["max_position_embeddings"]),
                "rms_norm_eps": float(c["rms_norm_eps"]),
                "initializer_range": float(c["initializer_range"]),
                "attention_bias": bool(c["attention_bias"]),
                "attention_dropout": 0.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": float(c["rope_theta"]),
                                    "partial_rotary_factor": float(c["partial_rotary_factor"]),
                                    "mrope_section": [int(c["mrope_temporal"]), int(c["mrope_height"]),
                                                      int(c["mrope_width"])]},
                "pad_token_id": int(pad) if pad is not None else vocab - 1,
                "eos_token_id": int(c["image_end_token_id"]),
                "use_cache": True,
            },
            "vision_config": {
                "model_type": "glm_image_vision",
                "depth": int(c["vision_depth"]),
                "hidden_size": int(c["vision_hidden_size"]),
                "num_heads": int(c["vision_num_heads"]),
                "intermediate_size": int(c["vision_intermediate_size"]),
                "image_size": int(c["vision_image_size"]),
                "patch_size": int(c["vision_patch_size"]),
                "in_channels": int(c["vision_in_channels"]),
                "layer_norm_eps": float(c["vision_layer_norm_eps"]),
                "attention_bias": bool(c["vision_attention_bias"]),
                "hidden_act": "gelu",
                "attention_dropout": 0.0,
                "spatial_merge_size": 1,
                "initializer_range": float(c["initializer_range"]),
            },
            "vq_config": {
                "model_type": "glm_image_vqmodel",
                "embed_dim": int(c["vq_embed_dim"]),
                "num_embeddings": int(c["vq_num_embeddings"]),
                "latent_channels": int(c["vision_hidden_size"]),
                "in_channels": int(c["vision_in_channels"]),
                "initializer_range": float(c["initializer_range"]),
            },
        }

    # ---- tensors -------------------------------------------------------------------------
    def rules(self, model: Mapping[str, Any]) -> list[Rule]:
        """Every Hugging Face tensor and the canonical tensors it holds."""
        text = "model.language_model"
        rules = [Rule(f"{text}.embed_tokens.weight", ("embed.weight",))]
        for i in range(int(model["num_hidden_layers"])):
            hf, ours = f"{text}.layers.{i}", f"layers.{i}"
            rules.append(Rule(f"{hf}.input_layernorm.weight", (f"{ours}.attn_norm.weight",)))
            for proj in "qkvo":
                rules.append(Rule(f"{hf}.self_attn.{proj}_proj.weight", (f"{ours}.attn.{proj}.weight",)))
                if proj != "o" and model["attention_bias"]:
                    rules.append(Rule(f"{hf}.self_attn.{proj}_proj.bias", (f"{ours}.attn.{proj}.bias",)))
            rules.append(Rule(f"{hf}.post_self_attn_layernorm.weight", (f"{ours}.post_attn_norm.weight",)))
            rules.append(Rule(f"{hf}.post_attention_layernorm.weight", (f"{ours}.mlp_norm.weight",)))
            rules.append(Rule(f"{hf}.mlp.gate_up_proj.weight", (f"{ours}.mlp.gate.weight", f"{ours}.mlp.up.weight")))
            rules.append(Rule(f"{hf}.mlp.down_proj.weight", (f"{ours}.mlp.down.weight",)))
            rules.append(Rule(f"{hf}.post_mlp_layernorm.weight", (f"{ours}.post_mlp_norm.weight",)))
        rules.append(Rule(f"{text}.norm.weight", ("norm.weight",)))
        rules.append(Rule("lm_head.weight", ("head.weight",)))
        visual = "model.visual"
        rules.append(Rule(f"{visual}.embeddings.position_embedding.weight", ("vision.position.weight",)))
        rules += [Rule(f"{visual}.patch_embed.proj.{kind}", (f"vision.patch.{kind}",)) for kind in ("weight", "bias")]
        biased = ("weight", "bias") if model["vision_attention_bias"] else ("weight",)
        for i in range(int(model["vision_depth"])):
            hf, ours = f"{visual}.blocks.{i}", f"vision.blocks.{i}"
            for part, kinds in (("norm1", ("weight", "bias")), ("norm2", ("weight", "bias")), ("attn.qkv", biased),
                                ("attn.proj", biased), ("mlp.fc1", ("weight", "bias")), ("mlp.fc2", ("weight", "bias"))):
                rules += [Rule(f"{hf}.{part}.{kind}", (f"{ours}.{part}.{kind}",)) for kind in kinds]
        vq = "model.vqmodel"
        rules.append(Rule(f"{vq}.quantize.embedding.weight", ("vq.codebook.weight",)))
        for conv in ("quant_conv", "post_quant_conv"):
            rules += [Rule(f"{vq}.{conv}.{kind}", (f"vq.{conv}.{kind}",)) for kind in ("weight", "bias")]
        return rules

    def ignored(self, foreign_name: str, model: Mapping[str, Any]) -> bool:
        """Rotary ``inv_freq`` buffers, which transformers recomputes."""
        return foreign_name.endswith("inv_freq")


def _comparable(section: Mapping[str, Any]) -> dict[str, Any]:
    """A section with its values in one type each (YAML may give 1 for 1.0), for comparison."""
    out = {}
    for key, value in section.items():
        if hasattr(value, "value"):
            value = value.value
        if key in FLOATS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


GLM_IMAGE = HfGlmImage()

__all__ = ["GLM_IMAGE", "HfGlmImage"]
