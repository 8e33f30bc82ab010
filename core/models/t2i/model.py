"""``tiny-t2i``: text to image as a GLM-Image-style hybrid, written against kernels only.

Two networks share one parameter tree and one loss:

* the **generator** (``gen.*``), a transformer that reads the caption tokens as a bidirectional
  prefix and predicts the image's visual codes (see :mod:`isthmus.models.t2i.visual_tokenizer`) one by
  one, causally, in raster order;
* the **decoder** (``dec.*``), a small diffusion transformer over the image's tiles. Looking up
  each code's tile gives a first rendering (``base``); the decoder draws what the tiles miss, the
  residual ``x_0 = image - base``. Given the codes, a noise level ``t`` and the noised residual
  ``x_t = cos(a) x_0 + sin(a) noise`` (cosine schedule, ``a = pi/2 (t + s) / (1 + s)``), it
  predicts the noise. On the bundled scenes a 1,024-code book already gets 99.8% of pixels right,
  so the residual is small; on richer images it is where the detail lives.

The training loss is the generator's cross-entropy over the codes plus ``diffusion_weight`` times
the decoder's mean squared noise error. The noise and levels come with each batch (drawn by the
data pipeline from a seed), so a step is a pure function of weights and batch on every engine.

Shapes: caption ``tokens`` ``(B, L)``, ``codes`` ``(B, G)`` with ``G = (image_size / patch_size)^2``,
generator logits ``(B, G, codebook_size)``: ``logits[:, i]`` predicts ``codes[:, i]`` from the caption
and ``codes[:, :i]``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from isthmus.config.values import build
from isthmus.models.t2i.config import T2IConfig
from isthmus.nn import layers
from isthmus.nn.layers import prefix_lm_mask
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any
SCHEDULE_OFFSET = 0.008  # the cosine schedule's ``s``: keeps the smallest noise level above zero
MAX_NOISE_LEVEL = 0.98  # the largest t trained and sampled; at t = 1 the signal would be exactly zero
MIN_NOISE_LEVEL = 0.05  # the smallest; the noise loss weighs a residual error by cot(a)^2, 120 here
RESIDUAL_SCALE = 0.25  # the decoder network's output unit, in [-1, 1] pixel units


def noise_angle(k: Any, levels: Tensor) -> Tensor:
    """The cosine schedule's angle ``a`` for noise levels ``t`` in [0, 1]: signal ``cos a``, noise ``sin a``."""
    return k.mul(k.add(levels, SCHEDULE_OFFSET), (math.pi / 2) / (1 + SCHEDULE_OFFSET))


def level_features(k: Any, levels: Tensor, dim: int) -> Tensor:
    """Sinusoidal features ``(B, dim)`` of noise levels ``(B,)``: ``[cos(f t), sin(f t)]`` over
    ``dim / 2`` frequencies from 1 to 1000 (in units of the whole 0..1 range)."""
    half = dim // 2
    frequencies = k.exp(k.mul(k.arange(0, half, dtype=k.dtype(levels)), math.log(1000.0) / max(half - 1, 1)))
    angles = k.mul(k.reshape(levels, (-1, 1)), k.reshape(frequencies, (1, half)))
    return k.concat([k.cos(angles), k.sin(angles)], axis=-1)


def leading(k: Any, x: Tensor, n: int, axis: int = 0) -> Tensor:
    """The first ``n`` entries of ``x`` along ``axis`` (``x`` itself when it has no more)."""
    size = k.shape(x)[axis]
    return k.split(x, [n, size - n], axis=axis)[0] if size > n else x


class TinyT2I(Model):
    """The ``tiny-t2i`` model (see the module docstring)."""

    name = "tiny-t2i"
    task = "text-to-image"

    def __init__(self, config: Mapping[str, Any] | T2IConfig, tokenizer: Any = None,
                 vocab_size: int | None = None) -> None:
        """``tokenizer``: the captions' tokenizer (its size is the text vocabulary unless the
        config or ``vocab_size`` sets one)."""
        self.tokenizer = tokenizer
        size = vocab_size if vocab_size is not None else (tokenizer.vocab_size if tokenizer is not None else None)
        self.config = build(T2IConfig, config, self.name, size)
        c = self.config
        self.gen_block = c.block(c.d_model, c.n_heads, c.n_layers)
        self.dec_block = c.block(c.decoder_d_model, c.decoder_heads, c.decoder_layers)
        self.visual: Any = None  # the VisualTokenizer, once bind_data has fitted or restored it

    # ---- data ------------------------------------------------------------------------------
    def bind_data(self, data: Any, seed: int, saved: Mapping[str, Any] | None = None) -> Any:
        """Fit the visual codebook on the training images (or take the ``saved`` one) and return
        both splits as :class:`~isthmus.models.t2i.coded.CodedDataset`."""
        from isthmus.models.t2i.coded import CodedDataset
        from isthmus.data.errors import DataError
        from isthmus.models.t2i.visual_tokenizer import VisualTokenizer

        c = self.config
        train, evaluation = data.train, data.eval
        longest = max(train.max_len, evaluation.max_len)
        if longest > c.max_caption_len:
            raise DataError(f"the captions need {longest} tokens but model.max_caption_len is {c.max_caption_len}: "
                            f"raise model.max_caption_len to at least {longest}")
        if saved is not None:
            self.visual = VisualTokenizer.from_dict(saved["visual_tokenizer"])
        else:
            self.visual = VisualTokenizer.fit(train.images, c.patch_size, c.codebook_size, seed, c.codebook_iterations)
        if self.visual.patch != c.patch_size or self.visual.size > c.codebook_size:
            raise DataError(f"the saved visual tokenizer ({self.visual.size} codes of {self.visual.patch}px tiles) "
                            f"does not fit model.codebook_size={c.codebook_size}, model.patch_size={c.patch_size}")
        return data.with_splits(CodedDataset(train, self.visual, seed, caption_dropout=c.caption_dropout),
                                CodedDataset(evaluation, self.visual, seed))

    def data_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps to rebuild the data view: the visual codebook."""
        return {"visual_tokenizer": self.visual.to_dict()}

    def evaluate(self, backend: Any, params: Mapping[str, Any], dataset: Any, *, batch_size: int = 128,
                 max_samples: int | None = None, policy: Any = None, final: bool = True,
                 out_dir: Any = None, **options: Any) -> dict[str, Any]:
        """Held-out losses; with ``final=True`` also images for the held-out captions, their grid
        and the closed-loop match (see :func:`isthmus.models.t2i.evaluate.evaluate`). Options:
        ``judge`` (a captioning checkpoint; default ``model.judge``) and ``seed`` (of the draws)."""
        from isthmus.models.t2i.evaluate import evaluate

        return evaluate(self, backend, params, dataset, batch_size=batch_size, max_samples=max_samples,
                        policy=policy, final=final, out_dir=out_dir, **options)

    # ---- parameters ------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """``gen.*`` (the generator) then ``dec.*`` (the diffusion decoder)."""
        c = self.config
        specs: dict[str, ParamSpec] = {}
        add_specs(specs, "gen.text", layers.embedding_specs(c.vocab_size, c.d_model))
        # Absolute caption positions: the templated captions bind a colour to a shape by where the
        # words stand, which rotary (relative) positions alone let the generator learn only slowly.
        add_specs(specs, "gen.text_position", layers.embedding_specs(c.max_caption_len, c.d_model))
        # One extra row: the start code that the first image position reads.
        add_specs(specs, "gen.codes", layers.embedding_specs(c.codebook_size + 1, c.d_model))
        add_specs(specs, "gen.position", layers.embedding_specs(c.num_codes, c.d_model))
        for i in range(c.n_layers):
            add_specs(specs, f"gen.blocks.{i}", layers.block_specs(self.gen_block))
        add_specs(specs, "gen.norm", layers.norm_specs(c.norm, c.d_model))
        add_specs(specs, "gen.head", layers.linear_specs(c.d_model, c.codebook_size, bias=False))
        width = c.decoder_d_model
        add_specs(specs, "dec.patch", layers.patch_embed_specs(c.channels, c.patch_size, width))
        add_specs(specs, "dec.codes", layers.embedding_specs(c.codebook_size, width))
        add_specs(specs, "dec.position", layers.embedding_specs(c.num_codes, width))
        add_specs(specs, "dec.level.fc1", layers.linear_specs(width, width))
        add_specs(specs, "dec.level.fc2", layers.linear_specs(width, width))
        for i in range(c.decoder_layers):
            add_specs(specs, f"dec.blocks.{i}", layers.block_specs(self.dec_block))
        add_specs(specs, "dec.norm", layers.norm_specs(c.norm, width))
        # Nearly zero output: the decoder starts at drawing no residual (the codebook's tiles), so
        # its early noise-loss gradients stay out of the global clipping norm the generator shares.
        specs["dec.out.weight"] = ParamSpec((c.tile_width, width), "normal", layers.INIT_STD / 200)
        specs["dec.out.bias"] = ParamSpec((c.tile_width,), "zeros", decay=False)
        return specs

    def activation_bytes(self, batch_size: int, training: bool = True) -> int:
        """The generator stack over caption + codes with its code logits, and the decoder stack
        over the tiles with the images, noise and residuals it reads and draws."""
        c = self.config
        generator = layers.stack_activation_bytes(c.max_caption_len + c.num_codes, self.gen_block, c.n_layers,
                                                  batch_size, training)
        decoder = layers.stack_activation_bytes(c.num_codes, self.dec_block, c.decoder_layers, batch_size, training)
        logits = batch_size * c.num_codes * (c.codebook_size + 1) * 4 * (3 if training else 2)
        images = 8 * batch_size * c.channels * c.image_size**2 * 4
        return generator + decoder + logits + images

    # ---- the generator ---------------------------------------------------------------------
    def generator_logits(self, k: Any, params: Mapping[str, Any], tokens: Tensor, codes: Tensor,
                         training: bool = False) -> Tensor:
        """Logits ``(B, n, codebook_size)`` for the first ``n`` image positions, where ``codes`` is
        ``(B, m)`` with ``m >= n - 1``: position ``i`` reads the start code and ``codes[:, :i]``.

        Pass ``n = m + 1`` while sampling (the logits of the next code) or all ``G`` codes while
        training (the last code is then never read).
        """
        return self._generator(k, params, tokens, codes, min(k.shape(codes)[1] + 1, self.config.num_codes), training)

    def _generator(self, k: Any, params: Mapping[str, Any], tokens: Tensor, codes: Tensor, positions: int,
                   training: bool) -> Tensor:
        c, gen = self.config, Scope(params, "gen")
        batch, prefix = k.shape(tokens)[0], k.shape(tokens)[1]
        start = k.full((batch, 1), c.codebook_size, "int64")
        inputs = k.concat([start, codes], axis=1) if k.shape(codes)[1] else start
        image = layers.embedding(k, gen.sub("codes"), leading(k, inputs, positions, axis=1))
        image = k.add(image, leading(k, gen["position.weight"], positions))
        if prefix > c.max_caption_len:
            raise ValueError(f"captions of {prefix} tokens are longer than model.max_caption_len={c.max_caption_len}")
        text = layers.embedding(k, gen.sub("text"), tokens)
        text = k.add(text, leading(k, gen["text_position.weight"], prefix))
        x = k.concat([text, image], axis=1)
        total = prefix + positions
        dtype = k.dtype(x)
        wide = "float64" if dtype == "float64" else "float32"
        cos, sin = layers.rotary_tables(k, total, c.d_model // c.n_heads, dtype=wide)
        rope = (k.cast(cos, dtype), k.cast(sin, dtype))
        mask = prefix_lm_mask(k, prefix, total)
        for i in range(c.n_layers):
            x = layers.block(k, gen.sub(f"blocks.{i}"), x, self.gen_block, rope=rope, mask=mask, training=training)
        x = k.split(x, [prefix, positions], axis=1)[1]
        x = layers.norm(k, gen.sub("norm"), x, c.norm, c.norm_eps)
        return layers.linear(k, gen.sub("head"), x)

    # ---- the decoder -----------------------------------------------------------------------
    def predict_noise(self, k: Any, params: Mapping[str, Any], noisy: Tensor, codes: Tensor, levels: Tensor,
                      training: bool = False) -> Tensor:
        """The decoder's noise estimate ``(B, C, H, W)`` for noised residuals, their codes ``(B, G)``
        and noise levels ``(B,)``."""
        c, dec = self.config, Scope(params, "dec")
        width = c.decoder_d_model
        x = layers.patch_embed(k, dec.sub("patch"), noisy, c.patch_size)
        x = k.add(k.add(x, layers.embedding(k, dec.sub("codes"), codes)), dec["position.weight"])
        level = layers.linear(k, dec.sub("level.fc1"), level_features(k, levels, width))
        level = layers.linear(k, dec.sub("level.fc2"), k.silu(level))
        x = k.add(x, k.reshape(level, (-1, 1, width)))
        for i in range(c.decoder_layers):
            x = layers.block(k, dec.sub(f"blocks.{i}"), x, self.dec_block, training=training)
        x = layers.norm(k, dec.sub("norm"), x, c.norm, c.norm_eps)
        residual = k.mul(self.untile(k, layers.linear(k, dec.sub("out"), x)), RESIDUAL_SCALE)
        # The network draws the residual; the noise estimate follows from x_t exactly:
        # (x_t - cos(a) residual) / sin(a). A network that had to output the noise itself would
        # copy 48 noise values per tile through its residual stream, and the sampler's clean
        # estimate would divide that copy's error by cos(a), about 0.03 at the largest level.
        angle = k.reshape(noise_angle(k, levels), (-1, 1, 1, 1))
        return k.div(k.sub(noisy, k.mul(residual, k.cos(angle))), k.sin(angle))

    def untile(self, k: Any, tiles: Tensor) -> Tensor:
        """``(B, G, C * p * p)`` tiles, row-major, to images ``(B, C, H, W)``."""
        c = self.config
        batch = k.shape(tiles)[0]
        grid = k.reshape(tiles, (batch, c.grid, c.grid, c.channels, c.patch_size, c.patch_size))
        return k.reshape(k.transpose(grid, (0, 3, 1, 4, 2, 5)), (batch, c.channels, c.image_size, c.image_size))

    @staticmethod
    def noised(k: Any, images: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        """``cos(a) images + sin(a) noise`` per sample."""
        angle = k.reshape(noise_angle(k, levels), (-1, 1, 1, 1))
        return k.add(k.mul(images, k.cos(angle)), k.mul(noise, k.sin(angle)))

    # ---- the Model interface ---------------------------------------------------------------
    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Tensor:
        """The generator's logits ``(B, G, codebook_size)`` for ``batch["tokens"]`` and ``batch["codes"]``."""
        codes = batch["codes"]
        return self._generator(k, params, batch["tokens"], codes, self.config.num_codes, training)

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = True
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """Code cross-entropy + ``diffusion_weight`` x noise MSE; metrics ``code_accuracy``,
        ``code_loss`` and ``noise_mse``."""
        c = self.config
        logits = self.forward(k, params, batch, training)
        batch_size = k.shape(logits)[0]
        flat = k.reshape(logits, (batch_size * c.num_codes, c.codebook_size))
        targets = k.reshape(batch["codes"], (batch_size * c.num_codes,))
        code_loss = k.cross_entropy(flat, targets)
        dtype = k.dtype(logits)
        images, base, noise, levels = (k.cast(batch[name], dtype) for name in ("images", "base", "noise", "levels"))
        residual = k.sub(images, base)
        estimate = self.predict_noise(k, params, self.noised(k, residual, noise, levels), batch["codes"], levels, training)
        error = k.sub(estimate, noise)
        noise_mse = k.mean(k.mul(error, error))
        total = k.add(code_loss, k.mul(noise_mse, c.diffusion_weight))
        hits = k.mean(k.cast(k.equal(k.argmax(flat, axis=-1), targets), dtype))
        return total, {"code_accuracy": hits, "code_loss": code_loss, "noise_mse": noise_mse}


__all__ = ["T2IConfig", "TinyT2I", "level_features", "noise_angle"]
