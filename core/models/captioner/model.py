"""``tiny-captioner``: a patch-embedding vision encoder and a causal text decoder that reads the
image tokens as a prefix (a prefix-LM), written against kernels only.

Shapes: images ``(B, C, H, W)`` become ``P = (H // patch) * (W // patch)`` image tokens ``(B, P, d)``
(learned positions, bidirectional blocks). The decoder runs on ``[image tokens] + [embedded text
tokens]`` with rotary positions over the whole sequence and a prefix-LM mask: image tokens see each
other, text token ``i`` sees every image token and text tokens ``<= i``. Logits come out for the
text positions only, so ``logits[:, i]`` predicts ``targets[:, i]`` (the token after ``tokens[:, i]``).
"""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.config.values import build
from isthmus.models.captioner.config import CaptionerConfig
from isthmus.nn import layers
from isthmus.nn.layers import prefix_lm_mask
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any
IGNORE_INDEX = -100


class TinyCaptioner(Model):
    """The ``tiny-captioner`` model (see the module docstring)."""

    name = "tiny-captioner"
    task = "captioning"

    def __init__(self, config: Mapping[str, Any] | CaptionerConfig, tokenizer: Any = None,
                 vocab_size: int | None = None) -> None:
        """``tokenizer`` gives the vocabulary size (unless the config or ``vocab_size`` sets it) and
        the ids of ``<bos>``, ``<eos>`` and ``<pad>`` that generation uses."""
        self.tokenizer = tokenizer
        size = vocab_size if vocab_size is not None else (tokenizer.vocab_size if tokenizer is not None else None)
        self.config = build(CaptionerConfig, config, self.name, size)
        self.vision_block = self.config.block(self.config.n_layers_vision)
        self.text_block = self.config.block(self.config.n_layers_text)

    # ---- evaluation and export ---------------------------------------------------------------
    def evaluate(self, backend: Any, params: Mapping[str, Any], dataset: Any, *, batch_size: int = 128,
                 max_samples: int | None = None, policy: Any = None, final: bool = True,
                 out_dir: Any = None, **options: Any) -> dict[str, Any]:
        """Loss, token accuracy and caption exact match (see :mod:`.evaluate`)."""
        from isthmus.errors import IsthmusError
        from isthmus.models.captioner.evaluate import evaluate

        if options:
            raise IsthmusError(f"--option {next(iter(options))}: {self.name} takes no evaluation options")
        return evaluate(self, backend, params, dataset, batch_size=batch_size, max_samples=max_samples, policy=policy)

    def export_checks(self, backend: Any, params: Mapping[str, Any], run_file: Any, host_batch: Mapping[str, Any],
                      tolerance: float) -> list[Any]:
        """Greedy captions decoded through the exported file equal the source backend's."""
        from isthmus.models.captioner.export_check import caption_check

        return [caption_check(self, backend, params, run_file, host_batch, tolerance)]

    # ---- parameters ------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """Every parameter by dotted name: ``vision.*`` then ``text.*``."""
        c = self.config
        specs: dict[str, ParamSpec] = {}
        add_specs(specs, "vision.patch", layers.patch_embed_specs(c.channels, c.patch_size, c.d_model))
        add_specs(specs, "vision.position", layers.embedding_specs(c.num_patches, c.d_model))
        for i in range(c.n_layers_vision):
            add_specs(specs, f"vision.blocks.{i}", layers.block_specs(self.vision_block))
        add_specs(specs, "vision.norm", layers.norm_specs(c.norm, c.d_model))
        add_specs(specs, "text.embed", layers.embedding_specs(c.vocab_size, c.d_model))
        for i in range(c.n_layers_text):
            add_specs(specs, f"text.blocks.{i}", layers.block_specs(self.text_block))
        add_specs(specs, "text.norm", layers.norm_specs(c.norm, c.d_model))
        add_specs(specs, "text.head", layers.linear_specs(c.d_model, c.vocab_size, bias=False))
        return specs

    def activation_bytes(self, batch_size: int, training: bool = True) -> int:
        """The vision stack over the patches, the text stack over patches + caption, and the
        logits over the vocabulary (with their softmax and gradient when training)."""
        c = self.config
        tokens = c.num_patches + c.max_caption_len
        vision = layers.stack_activation_bytes(c.num_patches, self.vision_block, c.n_layers_vision, batch_size, training)
        text = layers.stack_activation_bytes(tokens, self.text_block, c.n_layers_text, batch_size, training)
        logits = batch_size * c.max_caption_len * c.vocab_size * 4 * (3 if training else 1)
        images = batch_size * c.channels * c.image_size**2 * 4
        return vision + text + logits + images

    # ---- the network -----------------------------------------------------------------------
    def encode_images(self, k: Any, params: Mapping[str, Any], images: Tensor, training: bool = False) -> Tensor:
        """Image tokens ``(B, P, d)`` for images ``(B, C, H, W)``."""
        c, vision = self.config, Scope(params, "vision")
        weight = vision["patch.weight"]
        # Batches arrive as float32 numpy data; computing in the parameters' dtype keeps float64
        # checks (and any other storage dtype) consistent.
        x = layers.patch_embed(k, vision.sub("patch"), k.cast(images, k.dtype(weight)), c.patch_size)
        x = k.add(x, vision["position.weight"])
        for i in range(c.n_layers_vision):
            x = layers.block(k, vision.sub(f"blocks.{i}"), x, self.vision_block, training=training)
        return layers.norm(k, vision.sub("norm"), x, c.norm, c.norm_eps)

    def decode(
        self, k: Any, params: Mapping[str, Any], image_tokens: Tensor, tokens: Tensor, training: bool = False
    ) -> Tensor:
        """Next-token logits ``(B, L, vocab)`` for text ``tokens`` ``(B, L)`` after the image prefix."""
        c, text = self.config, Scope(params, "text")
        prefix, length = k.shape(image_tokens)[1], k.shape(tokens)[1]
        total = prefix + length
        x = k.concat([image_tokens, layers.embedding(k, text.sub("embed"), tokens)], axis=1)
        dtype = k.dtype(image_tokens)
        # Angles in at least float32: half-precision positions and angles lose the phase quickly.
        wide = "float64" if dtype == "float64" else "float32"
        cos, sin = layers.rotary_tables(k, total, c.d_model // c.n_heads, dtype=wide)
        rope = (k.cast(cos, dtype), k.cast(sin, dtype))
        mask = prefix_lm_mask(k, prefix, total)
        for i in range(c.n_layers_text):
            x = layers.block(k, text.sub(f"blocks.{i}"), x, self.text_block, rope=rope, mask=mask,
                             training=training)
        x = k.split(x, [prefix, length], axis=1)[1]
        x = layers.norm(k, text.sub("norm"), x, c.norm, c.norm_eps)
        return layers.linear(k, text.sub("head"), x)

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Tensor:
        """Logits ``(B, L, vocab)`` for ``batch["images"]`` and ``batch["tokens"]``."""
        image_tokens = self.encode_images(k, params, batch["images"], training)
        return self.decode(k, params, image_tokens, batch["tokens"], training)

    def loss(
        self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy over non-padding targets, and ``token_accuracy`` over the same targets."""
        logits = self.forward(k, params, batch, training)
        batch_size, length, vocab = k.shape(logits)
        flat_logits = k.reshape(logits, (batch_size * length, vocab))
        targets = k.reshape(batch["targets"], (batch_size * length,))
        loss = k.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX)
        return loss, {"token_accuracy": self.token_accuracy(k, flat_logits, targets)}

    @staticmethod
    def token_accuracy(k: Any, logits: Tensor, targets: Tensor) -> Tensor:
        """Share of non-ignored ``targets`` ``(N,)`` that ``argmax(logits)`` ``(N, C)`` gets right."""
        dtype = k.dtype(logits)
        # A prediction is a class index >= 0, so it never equals the ignore index.
        hits = k.sum(k.cast(k.equal(k.argmax(logits, axis=-1), targets), dtype))
        counted = k.sum(k.cast(k.greater(targets, IGNORE_INDEX), dtype))
        return k.div(hits, k.maximum(counted, 1.0))

    def generate(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], max_len: int | None = None,
                 **options: Any) -> Tensor:
        """Greedy captions of ``batch["images"]`` as token ids (see :meth:`caption`), with the
        tokenizer's special ids."""
        if options:
            raise ValueError(f"{self.name} generate takes max_len only, not {', '.join(options)}")
        tok = self.tokenizer
        ids = (tok.bos_id, tok.eos_id, tok.pad_id) if tok is not None else (1, 2, 0)
        return self.caption(k, params, batch["images"], max_len, *ids)

    def caption(
        self,
        k: Any,
        params: Mapping[str, Any],
        images: Tensor,
        max_len: int | None = None,
        bos_id: int = 1,
        eos_id: int = 2,
        pad_id: int = 0,
    ) -> Tensor:
        """Greedy captions: int64 ``(B, max_len)`` of the tokens after ``<bos>``.

        Each row holds its caption, ``eos_id``, then ``pad_id`` to the end (no ``eos_id`` if the
        caption did not end within ``max_len``). ``max_len`` defaults to ``max_caption_len - 1``.
        The decoder reruns on the whole prefix each step: at this size that beats keeping a cache,
        and the loop runs a fixed number of steps so it traces into a static graph.
        """
        steps = self.config.max_caption_len - 1 if max_len is None else max_len
        image_tokens = self.encode_images(k, params, images)
        batch_size = k.shape(image_tokens)[0]
        tokens = k.full((batch_size, 1), bos_id, "int64")
        finished = k.zeros((batch_size,), "int64")
        produced = []
        for step in range(steps):
            logits = k.take(self.decode(k, params, image_tokens, tokens), step, axis=1)
            chosen = k.where(k.greater(finished, 0), pad_id, k.argmax(logits, axis=-1))
            finished = k.maximum(finished, k.cast(k.equal(chosen, eos_id), "int64"))
            column = k.reshape(chosen, (batch_size, 1))
            produced.append(column)
            tokens = k.concat([tokens, column], axis=1)
        if not produced:
            return k.zeros((batch_size, 0), "int64")
        return k.concat(produced, axis=1)


__all__ = ["TinyCaptioner"]
