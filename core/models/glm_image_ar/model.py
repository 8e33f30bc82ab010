"""GLM-Image's autoregressive stage as one model: the generator and the image tokenizer that feeds it.

The generator is the decoder family's GLM-4 block (:class:`isthmus.models.decoder_lm.model.DecoderLM`
blocks, reused as they are: pre and post RMSNorms around attention and the SwiGLU feed-forward, q/k/v
biases, grouped-query attention), with two differences transformers' ``GlmImageTextModel`` makes:
the rotary turns the first ``rotary_dim`` features of each head in half-split pairs, and its
frequencies are M-RoPE sections, each turned by one coordinate of a 3-D position (see
:mod:`isthmus.models.glm_image_ar.positions`); and the head scores the ``vision_vocab_size`` first
ids only (``lm_head`` of ``GlmImageForConditionalGeneration``).

Training (``loss``) reads caption ``tokens`` ``(B, L)`` and ``images`` ``(B, C, H, W)``: the images
are tokenized by the model's own (frozen) tokenizer, the sequence is
``caption + offset, image_start, codes`` and the loss is the cross-entropy of the codes and the
closing ``image_end``; caption ids are shifted past the vision vocabulary (``+ vision_vocab_size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from isthmus.config.values import build
from isthmus.models.decoder_lm import rope
from isthmus.models.decoder_lm.config import DecoderConfig
from isthmus.models.decoder_lm.model import DecoderLM
from isthmus.models.glm_image_ar import positions as positions_
from isthmus.models.glm_image_ar import tokenizer as image_tokenizer
from isthmus.models.glm_image_ar.config import NAME, GlmImageArConfig
from isthmus.nn import layers
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any
Cache = list[tuple[Tensor, Tensor]]
IGNORE_INDEX = -100


class GlmImageAR(Model):
    """GLM-Image's generator with its vision encoder and VQ quantizer (see the module docstring)."""

    name = NAME
    task = "text-to-image-tokens"

    def __init__(self, config: Mapping[str, Any] | GlmImageArConfig, tokenizer: Any = None) -> None:
        """``tokenizer``: the captions' (their ids are shifted past the vision vocabulary)."""
        self.tokenizer = tokenizer
        c = build(GlmImageArConfig, config, NAME, GlmImageArConfig.vocab_size)  # the schema's default when left out
        fill = {"pad_token_id": c.vocab_size - 1, "image_token_id": c.vocab_size - 2}
        self.config = dataclasses.replace(c, **{k: v for k, v in fill.items() if getattr(c, k) is None})
        self.decoder = DecoderLM(self.decoder_config())
        self.inverse_frequencies = rope.inverse_frequencies(self.decoder.config)
        self.sections = [axis for axis, count in enumerate(self.config.mrope_sections) for _ in range(count)]

    def decoder_config(self) -> DecoderConfig:
        """The GLM-4 block settings of the generator, for the decoder family's blocks."""
        c = self.config
        return DecoderConfig(
            name="glm4", vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, partial_rotary_factor=c.partial_rotary_factor,
            rope_interleaved=False, attention_bias=c.attention_bias, post_norms=True,
            initializer_range=c.initializer_range)

    def bind_data(self, data: Any, seed: int, saved: Mapping[str, Any] | None = None) -> Any:
        """The data as it is; captioned images need room for the caption ids past the vision vocabulary."""
        from isthmus.data.errors import DataError

        tokenizer, c = data.tokenizer, self.config
        if tokenizer is not None and len(data.train) and "images" in data.train.batch([0]):
            if c.vision_vocab_size + tokenizer.vocab_size > c.vocab_size:
                raise DataError(f"captions take ids {c.vision_vocab_size} .. {c.vision_vocab_size + tokenizer.vocab_size - 1} "
                                f"(after the vision vocabulary) but model.vocab_size is {c.vocab_size}; use a "
                                f"vocab_size of at least {c.vision_vocab_size + tokenizer.vocab_size}")
        return data

    # ---- parameters ------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """The generator's (``embed``, ``layers.<i>.*``, ``norm``, ``head`` over the vision
        vocabulary), then the tokenizer's (``vision.*``, ``vq.*``)."""
        c = self.config
        specs = {name: spec for name, spec in self.decoder.param_specs().items() if not name.startswith("head.")}
        add_specs(specs, "head", layers.linear_specs(c.hidden_size, c.vision_vocab_size, bias=False,
                                                     std=c.initializer_range))
        specs.update(image_tokenizer.param_specs(c))
        return specs

    # ---- the generator ---------------------------------------------------------------------
    def rotary(self, k: Any, positions: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``(B, 1, S, rotary_dim / 2)`` for int64 3-D ``positions`` ``(B, 3, S)``:
        frequency ``j`` turns with the coordinate of its section. Angles in float32 at least."""
        wide = "float64" if dtype == "float64" else "float32"
        batch_size, _, length = k.shape(positions)
        half = len(self.inverse_frequencies)
        chosen = k.take(positions, k.asarray(self.sections, "int64"), axis=1)  # (B, half, S)
        chosen = k.transpose(k.cast(chosen, wide), (0, 2, 1))
        angles = k.mul(chosen, k.reshape(k.asarray(self.inverse_frequencies, wide), (1, 1, half)))
        cos, sin = (k.reshape(k.cast(f(angles), dtype), (batch_size, 1, length, half)) for f in (k.cos, k.sin))
        return cos, sin

    def logits(self, k: Any, params: Mapping[str, Any], x: Tensor) -> Tensor:
        """The final norm and the head: ``(B, S, vision_vocab_size)``."""
        x = layers.rms_norm(k, Scope(params, "norm"), x, self.config.rms_norm_eps)
        return k.linear(x, params["head.weight"])

    def text_positions(self, k: Any, tokens: Tensor) -> Tensor:
        """``(B, 3, S)`` positions ``0 .. S - 1`` on all three coordinates (text only)."""
        batch_size, length = k.shape(tokens)
        row = k.reshape(k.arange(length), (1, 1, length))
        return k.add(k.zeros((batch_size, 3, length), "int64"), row)

    def generator(self, k: Any, params: Mapping[str, Any], tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits ``(B, S, vision_vocab_size)`` of ``tokens`` ``(B, S)`` at 3-D ``positions`` ``(B, 3, S)``
        (text positions when None), causal."""
        x = self.decoder.embed(k, params, tokens)
        cos, sin = self.rotary(k, positions if positions is not None else self.text_positions(k, tokens), k.dtype(x))
        for i in range(self.config.num_hidden_layers):
            x, _ = self.decoder.block(k, Scope(params, f"layers.{i}"), x, cos, sin)
        return self.logits(k, params, x)

    # ---- the image tokenizer ---------------------------------------------------------------
    def image_codes(self, k: Any, params: Mapping[str, Any], images: Tensor) -> Tensor:
        """int64 image tokens ``(B, rows * cols)`` of ``images`` ``(B, C, H, W)``, row-major."""
        return image_tokenizer.image_codes(k, params, self.config, images)

    def code_vectors(self, k: Any, params: Mapping[str, Any], codes: Tensor) -> Tensor:
        """The quantizer's unit vectors of int ``codes``: ``codes.shape + (vq_embed_dim,)``."""
        return image_tokenizer.code_vectors(k, params, self.config, codes)

    # ---- training --------------------------------------------------------------------------
    def training_sequence(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any]
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens, positions, targets)`` for caption ``tokens`` and ``images``: the caption (ids
        shifted by ``vision_vocab_size``), ``image_start`` and the image's codes at their 3-D
        positions; the targets are the codes and ``image_end``, -100 over the caption."""
        c = self.config
        caption = batch["tokens"]
        batch_size, length = k.shape(caption)
        codes = self.image_codes(k, params, batch["images"])
        grid = k.shape(codes)[1]
        side = int(round(grid ** 0.5))
        tokens = k.concat([k.add(caption, c.vision_vocab_size),
                           k.full((batch_size, 1), c.image_start_token_id, "int64"), codes], axis=1)
        where = positions_.training(length, side, grid // side)
        at = k.add(k.zeros((batch_size, 3, length + 1 + grid), "int64"), k.asarray(where))
        targets = k.concat([k.full((batch_size, length), IGNORE_INDEX, "int64"), codes,
                            k.full((batch_size, 1), c.image_end_token_id, "int64")], axis=1)
        return tokens, at, targets

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Tensor:
        """Generator logits ``(B, S, vision_vocab_size)``: of ``batch["tokens"]`` at
        ``batch["positions"]`` (``(B, 3, S)``, text positions when absent), or, when the batch has
        ``images``, of the training sequence built from them and the caption."""
        if "images" in batch:
            tokens, at, _ = self.training_sequence(k, params, batch)
            return self.generator(k, params, tokens, at)
        return self.generator(k, params, batch["tokens"], batch.get("positions"))

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
             training: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy over the image tokens (the codes and ``image_end``), and
        ``code_accuracy``. Without ``images``: over ``batch["targets"]`` in the vision vocabulary
        (-100, or any other id, does not count)."""
        if "images" in batch:
            tokens, at, targets = self.training_sequence(k, params, batch)
        else:  # the head scores the vision vocabulary only: any other target cannot count
            tokens, at, targets = batch["tokens"], batch.get("positions"), batch["targets"]
            targets = k.where(k.less(targets, self.config.vision_vocab_size), targets, IGNORE_INDEX)
        logits = self.generator(k, params, tokens, at)
        batch_size, length, vocab = k.shape(logits)
        flat = k.reshape(logits, (batch_size * length, vocab))
        targets = k.reshape(targets, (batch_size * length,))
        loss = k.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)
        dtype = k.dtype(flat)
        hits = k.sum(k.cast(k.equal(k.argmax(flat, axis=-1), targets), dtype))
        counted = k.sum(k.cast(k.greater(targets, IGNORE_INDEX), dtype))
        return loss, {"code_accuracy": k.div(hits, k.maximum(counted, 1.0))}

    # ---- export ----------------------------------------------------------------------------
    def export_graphs(self, params: Mapping[str, Any], host_batch: Mapping[str, Any]) -> list[Any]:
        """The generator's KV-cache step graph (see :mod:`isthmus.models.glm_image_ar.export_check`)."""
        from isthmus.models.glm_image_ar.export_check import step_graph

        if "images" not in host_batch:
            return []
        return [step_graph(self, params, host_batch)]

    def export_checks(self, backend: Any, params: Mapping[str, Any], run_file: Any, host_batch: Mapping[str, Any],
                      tolerance: float, graphs: Mapping[str, Any] | None = None) -> list[Any]:
        """Greedy image tokens through the exported step graph equal the source backend's."""
        from isthmus.models.glm_image_ar.export_check import STEP, generation_check

        if not graphs or STEP not in graphs:
            return []
        return [generation_check(self, backend, params, host_batch, graphs[STEP])]

    # ---- generation ------------------------------------------------------------------------
    def empty_cache(self, k: Any, batch_size: int, length: int, dtype: str = "float32") -> Cache:
        """Zeroed keys and values for every layer."""
        return self.decoder.empty_cache(k, batch_size, length, dtype)

    def step(self, k: Any, params: Mapping[str, Any], tokens: Tensor, positions: Tensor, slot: Tensor,
             cache: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Cache]:
        """Logits ``(B, n, vision_vocab_size)`` of ``tokens`` ``(B, n)`` at 3-D ``positions``
        ``(B, 3, n)``, written into the cache from slot ``slot`` (int64 ``(B, 1)``) on; they attend
        to every slot up to their own. Every shape is fixed by ``B, n`` and the cache length."""
        batch_size, count = k.shape(tokens)
        length = k.shape(cache[0][0])[2]
        x = self.decoder.embed(k, params, tokens)
        cos, sin = self.rotary(k, positions, k.dtype(x))
        at = k.add(slot, k.reshape(k.arange(count), (1, count)))  # (B, n) cache slots
        slots = k.reshape(k.arange(length), (1, 1, 1, length))
        mine = k.reshape(at, (batch_size, 1, count, 1))
        if count == 1:
            write = k.equal(k.reshape(slots, (1, 1, length, 1)), mine)
        else:
            write = k.transpose(k.cast(k.equal(slots, mine), k.dtype(x)), (0, 1, 3, 2))
        mask = k.less(slots, k.add(mine, 1))
        updated: Cache = []
        for i in range(self.config.num_hidden_layers):
            x, kv = self.decoder.block(k, Scope(params, f"layers.{i}"), x, cos, sin, cache[i], write, mask)
            updated.append(kv)
        return self.logits(k, params, x), updated

    def generate(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], grids: Sequence[Sequence[int]] = (),
                 use_cache: bool = True, **options: Any) -> Tensor:
        """Greedy image tokens ``(B, sum(h * w))`` after the prompt ``batch["tokens"]`` ``(B, P)``
        (text ending with ``image_start``), for the images ``grids`` (``(h, w)`` each, in the
        order they are generated; default one ``grid x grid`` image), on the device. Sampling on
        the host: :func:`isthmus.models.glm_image_ar.generation.generate`."""
        if options:
            raise ValueError(f"{self.name} generate takes grids and use_cache, not {', '.join(options)}")
        grids = [tuple(g) for g in grids] or [(self.config.grid, self.config.grid)]
        tokens = batch["tokens"]
        batch_size, prompt = k.shape(tokens)
        before, after = positions_.text_to_image(prompt, grids)
        total = after.shape[1] - 1
        ones = k.zeros((batch_size, 3, 1), "int64")
        produced = []
        if use_cache:
            cache = self.empty_cache(k, batch_size, prompt + total, k.dtype(params["embed.weight"]))
            feed = tokens
            where = k.add(k.zeros((batch_size, 3, prompt), "int64"), k.asarray(before[None]))
            slot = k.zeros((batch_size, 1), "int64")
            for step in range(total):
                logits, cache = self.step(k, params, feed, where, slot, cache)
                feed = k.reshape(k.argmax(k.take(logits, -1, axis=1), axis=-1), (batch_size, 1))
                produced.append(feed)
                where = k.add(ones, k.asarray(after[None, :, step:step + 1]))
                slot = k.full((batch_size, 1), prompt + step, "int64")
        else:
            sequence = positions_.sequence(prompt, grids)
            for step in range(total):
                at = k.add(k.zeros((batch_size, 3, prompt + step), "int64"), k.asarray(sequence[:, :, :prompt + step]))
                chosen = k.reshape(k.argmax(k.take(self.generator(k, params, tokens, at), -1, axis=1), axis=-1),
                                   (batch_size, 1))
                tokens = k.concat([tokens, chosen], axis=1)
                produced.append(chosen)
        return k.concat(produced, axis=1)


__all__ = ["GlmImageAR", "IGNORE_INDEX"]
