"""The Hugging Face layout of the decoder family: ``config.json`` keys and tensor names of
``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Glm4ForCausalLM``.

What the three share: ``model.embed_tokens``, per layer ``input_layernorm`` (our ``attn_norm``),
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm`` (the norm *before* the feed-forward, our
``mlp_norm``), ``mlp.{gate,up,down}_proj``, then ``model.norm`` and ``lm_head``. Where they differ:
Llama's ``attention_bias`` covers all four projections and ``mlp_bias`` the feed-forward; Qwen2 always
has q/k/v biases and none elsewhere; GLM-4 has q/k/v biases (``attention_bias``), stacks gate and up
into one ``gate_up_proj`` (gate rows first), adds ``post_self_attn_layernorm`` and
``post_mlp_layernorm``, and rotates half of each head in interleaved pairs. Rotary settings come from
``rope_parameters`` (transformers 5) or the older ``rope_theta`` / ``rope_scaling`` /
``partial_rotary_factor`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from isthmus.interop.layout import LayoutError, Rule

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class HfDecoder:
    """The Hugging Face layout of one preset of the decoder family."""

    model: str
    architecture: str  # config.json's model_type
    class_name: str  # config.json's architectures entry
    eps: float  # rms_norm_eps when the config leaves it out
    max_positions: int  # max_position_embeddings when the config leaves it out
    partial: float = 1.0  # partial_rotary_factor when the config leaves it out
    weights_name: str = "model"  # model.safetensors, model.safetensors.index.json

    # ---- config --------------------------------------------------------------------------
    def model_config(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """The ``model`` section for a ``config.json`` of this architecture."""
        if hf.get("model_type") != self.architecture:
            raise LayoutError(f"config.json model_type {hf.get('model_type')!r} is not {self.architecture!r}")
        missing = [key for key in REQUIRED if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool)]
        if missing:
            raise LayoutError(f"config.json lacks {missing[0]} (an integer): a {self.architecture} config needs "
                              f"{', '.join(REQUIRED)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise LayoutError(f"config.json hidden_act {hf.get('hidden_act')!r}: the {self.model} family runs SwiGLU "
                              f"with silu only")
        if float(hf.get("attention_dropout") or 0.0) != 0.0:
            raise LayoutError(f"config.json attention_dropout {hf['attention_dropout']}: isthmus runs attention "
                              f"without dropout; set it to 0.0")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
            raise LayoutError("config.json use_sliding_window / layer_types: sliding-window attention is not "
                              "supported; isthmus runs full attention in every layer")
        heads = hf["num_attention_heads"]
        section: dict[str, Any] = {
            "name": self.model,
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim"),
            "max_position_embeddings": hf.get("max_position_embeddings") or self.max_positions,
            "rms_norm_eps": float(hf.get("rms_norm_eps") or self.eps),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "initializer_range": float(hf.get("initializer_range") or 0.02),
            **self._rope(hf),
            **self._biases(hf),
        }
        return section

    def _rope(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
            raise LayoutError("config.json rope_parameters: per-layer-type rotary settings are not supported")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise LayoutError(f"config.json rope type {kind!r} is not supported; isthmus runs {', '.join(ROPE_TYPES)}")
        for key in ("mscale", "mscale_all_dim"):
            if params.get(key):
                raise LayoutError(f"config.json rope_parameters.{key}: YaRN with {key} is not supported")
        partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        partial = self.partial if partial is None else float(partial)
        if self.model != "glm4" and partial != 1.0:
            if kind != "default":
                raise LayoutError(f"config.json partial_rotary_factor {partial}: the {self.architecture} layout "
                                  f"rotates whole heads")
            partial = 1.0  # transformers' default rope for this layout ignores it too
        factor = params.get("factor")
        original = params.get("original_max_position_embeddings")
        if kind in ("llama3", "yarn") and original is None:
            original = hf.get("max_position_embeddings") or self.max_positions
        return {
            "rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "rope_type": kind,
            "rope_factor": float(factor) if factor is not None else 1.0,
            "rope_low_freq_factor": float(params.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(params.get("high_freq_factor", 4.0)),
            "rope_original_max_position_embeddings": original,
            "rope_beta_fast": float(params.get("beta_fast") or 32.0),
            "rope_beta_slow": float(params.get("beta_slow") or 1.0),
            "rope_attention_factor": params.get("attention_factor"),
            "rope_truncate": bool(params.get("truncate", True)),
            "partial_rotary_factor": partial,
            "rope_interleaved": self.model == "glm4",
        }

    def _biases(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        if self.model == "llama":
            bias = bool(hf.get("attention_bias", False))
            return {"attention_bias": bias, "attention_output_bias": bias, "mlp_bias": bool(hf.get("mlp_bias", False)),
                    "post_norms": False}
        if self.model == "qwen2":
            return {"attention_bias": True, "attention_output_bias": False, "mlp_bias": False, "post_norms": False}
        return {"attention_bias": bool(hf.get("attention_bias", True)), "attention_output_bias": False,
                "mlp_bias": False, "post_norms": True}

    def foreign_config(self, model: Mapping[str, Any], original: Mapping[str, Any] | None, dtype: str) -> dict[str, Any]:
        """``config.json`` for a ``model`` section: ``original`` with its dtype updated when it maps
        to the same section (a round trip), else written from the section."""
        self._check_expressible(model)
        if original is not None:
            try:
                same = _comparable(self.model_config(original)) == _comparable(model)
            except LayoutError:
                same = False
            if same:
                config = dict(original)
                config["dtype"] = dtype
                if "torch_dtype" in config:
                    config["torch_dtype"] = dtype
                return config
        c = dict(model)
        head_dim = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
        rope: dict[str, Any] = {"rope_type": str(c["rope_type"]), "rope_theta": float(c["rope_theta"])}
        if self.model == "glm4":
            rope["partial_rotary_factor"] = float(c["partial_rotary_factor"])
        kind = str(c["rope_type"])
        if kind in ("linear", "llama3", "yarn"):
            rope["factor"] = float(c["rope_factor"])
        if kind == "llama3":
            rope.update(low_freq_factor=float(c["rope_low_freq_factor"]), high_freq_factor=float(c["rope_high_freq_factor"]))
        if kind in ("llama3", "yarn"):
            rope["original_max_position_embeddings"] = int(c["rope_original_max_position_embeddings"])
        if kind == "yarn":
            rope.update(beta_fast=float(c["rope_beta_fast"]), beta_slow=float(c["rope_beta_slow"]),
                        truncate=bool(c["rope_truncate"]))
            if c.get("rope_attention_factor") is not None:
                rope["attention_factor"] = float(c["rope_attention_factor"])
        config: dict[str, Any] = {
            "architectures": [self.class_name],
            "model_type": self.architecture,
            "vocab_size": c["vocab_size"],
            "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"],
            "num_key_value_heads": c["num_key_value_heads"],
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c["max_position_embeddings"],
            "rms_norm_eps": c["rms_norm_eps"],
            "initializer_range": c["initializer_range"],
            "tie_word_embeddings": bool(c["tie_word_embeddings"]),
            "attention_dropout": 0.0,
            "rope_parameters": rope,
            "use_cache": True,
            "dtype": dtype,
            # No tokenizer is known here: the families' defaults (GLM-4's pad id 151329) would not fit
            # a smaller vocabulary.
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        }
        if self.model == "llama":
            config.update(attention_bias=bool(c["attention_bias"]), mlp_bias=bool(c["mlp_bias"]))
        elif self.model == "glm4":
            config["attention_bias"] = bool(c["attention_bias"])
        else:
            config.update(use_sliding_window=False, max_window_layers=c["num_hidden_layers"])
        return config

    def _check_expressible(self, c: Mapping[str, Any]) -> None:
        """Refuse a section the Hugging Face class of this architecture cannot hold."""
        fixed = {
            "llama": {"post_norms": False, "rope_interleaved": False, "partial_rotary_factor": 1.0},
            "qwen2": {"post_norms": False, "rope_interleaved": False, "partial_rotary_factor": 1.0,
                      "attention_bias": True, "attention_output_bias": False, "mlp_bias": False},
            "glm4": {"post_norms": True, "rope_interleaved": True, "attention_output_bias": False, "mlp_bias": False},
        }[self.model]
        for key, value in fixed.items():
            if c.get(key) != value:
                raise LayoutError(f"model.{key}={c.get(key)} has no place in a Hugging Face {self.architecture} "
                                  f"config (it fixes {key}={value})")
        if self.model == "llama" and c.get("attention_bias") != c.get("attention_output_bias"):
            raise LayoutError("model.attention_bias and model.attention_output_bias differ, but a Hugging Face llama "
                              "config has one attention_bias for all four projections")

    # ---- tensors -------------------------------------------------------------------------
    def rules(self, model: Mapping[str, Any]) -> list[Rule]:
        """Every Hugging Face tensor and the canonical tensors it holds."""
        rules = [Rule("model.embed_tokens.weight", ("embed.weight",))]
        for i in range(int(model["num_hidden_layers"])):
            hf, ours = f"model.layers.{i}", f"layers.{i}"
            rules.append(Rule(f"{hf}.input_layernorm.weight", (f"{ours}.attn_norm.weight",)))
            for proj in "qkvo":
                rules.append(Rule(f"{hf}.self_attn.{proj}_proj.weight", (f"{ours}.attn.{proj}.weight",)))
                if model["attention_output_bias" if proj == "o" else "attention_bias"]:
                    rules.append(Rule(f"{hf}.self_attn.{proj}_proj.bias", (f"{ours}.attn.{proj}.bias",)))
            if model["post_norms"]:
                rules.append(Rule(f"{hf}.post_self_attn_layernorm.weight", (f"{ours}.post_attn_norm.weight",)))
            rules.append(Rule(f"{hf}.post_attention_layernorm.weight", (f"{ours}.mlp_norm.weight",)))
            kinds = ("weight", "bias") if model["mlp_bias"] else ("weight",)
            for kind in kinds:
                if self.model == "glm4":
                    rules.append(Rule(f"{hf}.mlp.gate_up_proj.{kind}", (f"{ours}.mlp.gate.{kind}", f"{ours}.mlp.up.{kind}")))
                else:
                    rules.append(Rule(f"{hf}.mlp.gate_proj.{kind}", (f"{ours}.mlp.gate.{kind}",)))
                    rules.append(Rule(f"{hf}.mlp.up_proj.{kind}", (f"{ours}.mlp.up.{kind}",)))
                rules.append(Rule(f"{hf}.mlp.down_proj.{kind}", (f"{ours}.mlp.down.{kind}",)))
            if model["post_norms"]:
                rules.append(Rule(f"{hf}.post_mlp_layernorm.weight", (f"{ours}.post_mlp_norm.weight",)))
        rules.append(Rule("model.norm.weight", ("norm.weight",)))
        if not model["tie_word_embeddings"]:
            rules.append(Rule("lm_head.weight", ("head.weight",)))
        return rules

    def data_overrides(self, model: Mapping[str, Any]) -> list[str]:
        """Text: the built-in sample text (``tokenizer.json`` beside the weights, when there is one,
        is added by the caller)."""
        return ["data=text-jsonl"]

    def ignored(self, foreign_name: str, model: Mapping[str, Any]) -> bool:
        """Rotary ``inv_freq`` buffers (older checkpoints saved them) and, with a tied head, a
        saved ``lm_head.weight`` (transformers ties it to the embedding on load and ignores it)."""
        if foreign_name.endswith(".rotary_emb.inv_freq"):
            return True
        return foreign_name == "lm_head.weight" and bool(model["tie_word_embeddings"])


def _comparable(section: Mapping[str, Any]) -> dict[str, Any]:
    """A section with its values in one type each (YAML may give 1 for 1.0), for comparison."""
    out = {}
    for key, value in section.items():
        if hasattr(value, "value"):
            value = value.value
        out[key] = float(value) if isinstance(value, int) and not isinstance(value, bool) and key.startswith(("rope_", "rms", "partial", "initializer")) else value
    return out


LLAMA = HfDecoder("llama", "llama", "LlamaForCausalLM", eps=1e-6, max_positions=2048)
QWEN2 = HfDecoder("qwen2", "qwen2", "Qwen2ForCausalLM", eps=1e-6, max_positions=32768)
GLM4 = HfDecoder("glm4", "glm4", "Glm4ForCausalLM", eps=1.5625e-7, max_positions=131072, partial=0.5)

__all__ = ["GLM4", "HfDecoder", "LLAMA", "QWEN2"]
