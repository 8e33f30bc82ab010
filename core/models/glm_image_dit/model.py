"""GLM-Image's DiT decoder, written against kernels only (diffusers' ``GlmImageTransformer2DModel``).

The prediction for latents ``x_t`` ``(B, C, H, W)``:

* patches ``(C p p)`` projected to ``inner_dim`` (``patch``), plus the prior image tokens of the
  autoregressive stage, one per patch, embedded (``prior_embed``; zeroed where ``prior_drop``) and
  passed through ``prior`` (``fc2(silu(fc1))``);
* the text (glyph) embeddings ``(B, T, text_embed_dim)`` through ``glyph`` (``fc2(gelu(fc1))``);
* ``temb = silu(time(sinusoid(timestep)) + condition(sinusoid(crop), sinusoid(target size)))``;
* ``num_layers`` blocks over the text and image streams together: AdaLayerNormZero (``ada``, twelve
  shift / scale / gate vectors per block, six per stream), attention over ``[text, image]`` with
  q/k layer norms and a 2-D rotary embedding on the image positions, and one feed-forward
  (``mlp``, tanh-GELU) shared by both streams;
* the continuous adaptive output norm (``out_ada``: scale and shift from ``temb``, no activation)
  and ``out``, unpatchified to ``(B, out_channels, H, W)``.
"""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.config.values import build
from isthmus.models.glm_image_dit import network
from isthmus.models.glm_image_dit.config import NAME, GlmImageDitConfig
from isthmus.nn import layers
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any
EPS = 1e-5
NUM_TRAIN_TIMESTEPS = 1000
# The twelve AdaLayerNormZero vectors of a block, in the order its linear layer writes them.
ADA = ("shift_msa", "c_shift_msa", "scale_msa", "c_scale_msa", "gate_msa", "c_gate_msa",
       "shift_mlp", "c_shift_mlp", "scale_mlp", "c_scale_mlp", "gate_mlp", "c_gate_mlp")


class GlmImageDit(Model):
    """See the module docstring. ``forward`` reads a training batch (clean ``latents``, ``noise``,
    ``sigma``, ``text``, ``prior_tokens``, ``prior_drop``, ``target_size``, ``crop_coords``) and
    returns the velocity predicted at ``x_t = latents + sigma (noise - latents)``; :meth:`predict` is
    the network on explicit inputs (what the sampler calls)."""

    task = "latent-diffusion"

    def __init__(self, config: Mapping[str, Any] | GlmImageDitConfig) -> None:
        self.config = config if isinstance(config, GlmImageDitConfig) else build(GlmImageDitConfig, config, NAME)
        self.name = NAME

    # ---- parameters ------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """``patch``, ``glyph.{fc1,fc2}``, ``prior_embed``, ``prior.{fc1,fc2}``,
        ``time.{fc1,fc2}``, ``condition.{fc1,fc2}``, ``blocks.<i>.{ada,attn.{q,k,v,o},mlp.{fc1,fc2}}``,
        ``out_ada`` and ``out``."""
        c = self.config
        std, dim, temb = c.initializer_range, c.inner_dim, c.time_embed_dim
        specs: dict[str, ParamSpec] = {}

        def linear(name: str, d_in: int, d_out: int) -> None:
            add_specs(specs, name, layers.linear_specs(d_in, d_out, std=std))

        linear("patch", c.in_channels * c.patch_size ** 2, dim)
        linear("glyph.fc1", c.text_embed_dim, dim)
        linear("glyph.fc2", dim, dim)
        add_specs(specs, "prior_embed", layers.embedding_specs(c.prior_vq_quantizer_codebook_size, dim, std))
        linear("prior.fc1", dim, dim)
        linear("prior.fc2", dim, dim)
        linear("time.fc1", temb, temb)
        linear("time.fc2", temb, temb)
        linear("condition.fc1", 4 * c.condition_dim, temb)
        linear("condition.fc2", temb, temb)
        for i in range(c.num_layers):
            at = f"blocks.{i}"
            linear(f"{at}.ada", temb, 12 * dim)
            for proj in "qkvo":
                linear(f"{at}.attn.{proj}", dim, dim)
            linear(f"{at}.mlp.fc1", dim, 4 * dim)
            linear(f"{at}.mlp.fc2", 4 * dim, dim)
        linear("out_ada", temb, 2 * dim)
        linear("out", dim, c.patch_size ** 2 * c.out_channels)
        return specs

    # ---- the network -----------------------------------------------------------------------
    def conditioning(self, k: Any, params: Mapping[str, Any], timestep: Tensor, target_size: Tensor,
                     crop_coords: Tensor, dtype: str) -> Tensor:
        """``temb`` ``(B, time_embed_dim)``: timestep and size conditions, summed, through silu."""
        c = self.config
        batch, wide = k.shape(timestep)[0], network.wide_dtype(dtype)
        t = k.cast(network.sinusoidal(k, timestep, c.time_embed_dim, wide), dtype)
        t = layers.linear(k, Scope(params, "time.fc2"), k.silu(layers.linear(k, Scope(params, "time.fc1"), t)))
        crop = k.reshape(network.sinusoidal(k, k.reshape(crop_coords, (2 * batch,)), c.condition_dim, wide),
                         (batch, 2 * c.condition_dim))
        size = k.reshape(network.sinusoidal(k, k.reshape(target_size, (2 * batch,)), c.condition_dim, wide),
                         (batch, 2 * c.condition_dim))
        cond = k.cast(k.concat([crop, size], axis=1), dtype)
        cond = layers.linear(k, Scope(params, "condition.fc2"),
                             k.silu(layers.linear(k, Scope(params, "condition.fc1"), cond)))
        return k.silu(k.add(t, cond))

    def attention(self, k: Any, scope: Scope, text: Tensor, image: Tensor,
                  rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Joint attention over ``[text, image]``; returns the two streams' outputs."""
        heads, text_len = self.config.num_attention_heads, k.shape(text)[1]
        image_len = k.shape(image)[1]
        x = k.concat([text, image], axis=1)
        q, key, value = (layers.split_heads(k, layers.linear(k, scope.sub(p), x), heads) for p in "qkv")
        q, key = k.layer_norm(q, None, None, EPS), k.layer_norm(key, None, None, EPS)
        cos, sin = rope
        turned = []
        for t in (q, key):
            text_part, image_part = k.split(t, [text_len, image_len], axis=2)
            turned.append(k.concat([text_part, network.rotate(k, image_part, cos, sin)], axis=2))
        out = layers.merge_heads(k, k.attention(turned[0], turned[1], value))
        out = layers.linear(k, scope.sub("o"), out)
        text_out, image_out = k.split(out, [text_len, image_len], axis=1)
        return text_out, image_out

    def block(self, k: Any, scope: Scope, image: Tensor, text: Tensor, temb: Tensor,
              rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One AdaLayerNormZero block over both streams."""
        dim = self.config.inner_dim
        m = dict(zip(ADA, k.split(layers.linear(k, scope.sub("ada"), temb), [dim] * 12, axis=1)))
        h = network.modulate(k, image, m["scale_msa"], m["shift_msa"])
        e = network.modulate(k, text, m["c_scale_msa"], m["c_shift_msa"])
        text_attn, image_attn = self.attention(k, scope.sub("attn"), e, h, rope)
        image = network.gated(k, image, image_attn, m["gate_msa"])
        text = network.gated(k, text, text_attn, m["c_gate_msa"])
        h = network.modulate(k, image, m["scale_mlp"], m["shift_mlp"])
        e = network.modulate(k, text, m["c_scale_mlp"], m["c_shift_mlp"])
        mlp = scope.sub("mlp")

        def feed_forward(x: Tensor) -> Tensor:
            return layers.linear(k, mlp.sub("fc2"), k.gelu(layers.linear(k, mlp.sub("fc1"), x), approximate="tanh"))

        image = network.gated(k, image, feed_forward(h), m["gate_mlp"])
        text = network.gated(k, text, feed_forward(e), m["c_gate_mlp"])
        return image, text

    def predict(self, k: Any, params: Mapping[str, Any], latents: Tensor, timestep: Tensor, text: Tensor,
                prior_tokens: Tensor, prior_drop: Tensor, target_size: Tensor, crop_coords: Tensor) -> Tensor:
        """The network's output ``(B, out_channels, H, W)`` for noisy ``latents`` ``(B, C, H, W)``,
        float ``timestep`` ``(B,)``, ``text`` ``(B, T, text_embed_dim)``, int ``prior_tokens``
        ``(B, (H / p) (W / p))``, bool ``prior_drop`` of the same shape, and float ``target_size``
        and ``crop_coords`` ``(B, 2)``. Runs in the dtype of ``latents``."""
        c = self.config
        p = c.patch_size
        dtype = k.dtype(latents)
        _, _, height, width = k.shape(latents)
        rows, cols = height // p, width // p
        rope = network.rotary_table(k, rows, cols, c.attention_head_dim, network.wide_dtype(dtype))
        image = layers.linear(k, Scope(params, "patch"), network.patchify(k, latents, p))
        glyph = Scope(params, "glyph")
        text = layers.linear(k, glyph.sub("fc2"), k.gelu(layers.linear(k, glyph.sub("fc1"), text)))
        prior = layers.embedding(k, Scope(params, "prior_embed"), prior_tokens)
        batch, count = k.shape(prior_tokens)
        prior = k.where(k.reshape(prior_drop, (batch, count, 1)), 0.0, prior)
        projector = Scope(params, "prior")
        prior = layers.linear(k, projector.sub("fc2"), k.silu(layers.linear(k, projector.sub("fc1"), prior)))
        image = k.add(image, prior)
        temb = self.conditioning(k, params, timestep, target_size, crop_coords, dtype)
        for i in range(c.num_layers):
            image, text = self.block(k, Scope(params, f"blocks.{i}"), image, text, temb, rope)
        scale, shift = k.split(layers.linear(k, Scope(params, "out_ada"), temb), [c.inner_dim] * 2, axis=1)
        image = network.modulate(k, image, scale, shift)
        image = layers.linear(k, Scope(params, "out"), image)
        return network.unpatchify(k, image, rows, cols, p)

    # ---- training --------------------------------------------------------------------------
    @staticmethod
    def noisy(k: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """``(x_t, timestep)`` of a training batch: ``x_t = latents + sigma (noise - latents)``
        (``(1 - sigma) latents + sigma noise``) and ``timestep = 1000 sigma - 1``, the offset the
        GLM-Image pipeline applies to the scheduler's timesteps."""
        latents, noise, sigma = batch["latents"], batch["noise"], batch["sigma"]
        count = k.shape(sigma)[0]
        s = k.reshape(k.cast(sigma, k.dtype(latents)), (count, 1, 1, 1))
        x_t = k.add(latents, k.mul(s, k.sub(noise, latents)))
        return x_t, k.sub(k.mul(k.cast(sigma, k.dtype(latents)), float(NUM_TRAIN_TIMESTEPS)), 1.0)

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Tensor:
        """The predicted velocity ``(B, out_channels, H, W)`` at the batch's noisy latents."""
        x_t, timestep = self.noisy(k, batch)
        return self.predict(k, params, x_t, timestep, k.cast(batch["text"], k.dtype(x_t)), batch["prior_tokens"],
                            batch["prior_drop"], k.cast(batch["target_size"], k.dtype(x_t)),
                            k.cast(batch["crop_coords"], k.dtype(x_t)))

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
             training: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow matching: the mean squared error between the prediction and the velocity
        ``noise - latents``."""
        prediction = self.forward(k, params, batch, training)
        target = k.sub(batch["noise"], batch["latents"])
        error = k.sub(prediction, k.cast(target, k.dtype(prediction)))
        return k.mean(k.mul(error, error)), {}

    def generate(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], **options: Any) -> Tensor:
        """Latents sampled from ``batch["noise"]`` with the flow-matching Euler sampler
        (:func:`isthmus.models.glm_image_dit.sampler.sample`); ``options``: ``steps``,
        ``guidance_scale`` and the scheduler settings of :class:`~isthmus.models.glm_image_dit.sampler.Schedule`."""
        from isthmus.models.glm_image_dit.sampler import sample

        return sample(self, k, params, batch, **options)


__all__ = ["ADA", "GlmImageDit", "NUM_TRAIN_TIMESTEPS"]
