"""The decoder family's network, written against kernels only.

Per block: ``x + [post_attn_norm](attn(attn_norm(x)))`` then ``x + [post_mlp_norm](mlp(mlp_norm(x)))``,
the bracketed norms being GLM-4's. Attention is grouped-query (``num_key_value_heads`` kv heads
shared by ``num_attention_heads`` query heads, ``k.attention`` reads head ``h // group``), with rotary
positions on the first ``rotary_dim`` features of queries and keys (half-split pairs, or interleaved
pairs for GLM-4). The feed-forward is SwiGLU: ``down(silu(gate(x)) * up(x))``.

Two entry points share the blocks: :meth:`DecoderLM.forward` runs whole sequences (causal, for training
and scoring) and :meth:`DecoderLM.step` runs ``n`` new tokens against a static KV cache of ``L`` slots
(generation; every shape is fixed by ``B, n, L``, so it exports as one graph). A row's new tokens sit
at positions ``positions[b] .. positions[b] + n - 1``; they are written into the cache slots of those
positions and attend to every slot up to their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from isthmus.config.values import build
from isthmus.models.decoder_lm import rope
from isthmus.models.decoder_lm.config import PRESETS, DecoderConfig
from isthmus.nn import layers
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any
Cache = list[tuple[Tensor, Tensor]]
IGNORE_INDEX = -100


class DecoderLM(Model):
    """A decoder-only language model of the Llama / Qwen2 / GLM-4 family (see the module docstring).

    A preset is its option file (``model/glm4.yaml``: interleaved partial rotary, post norms...),
    which ``model=glm4`` composes; a config given here directly takes the schema's defaults for the
    keys it leaves out, whatever its ``name``."""

    task = "text-generation"

    def __init__(self, config: Mapping[str, Any] | DecoderConfig, tokenizer: Any = None,
                 vocab_size: int | None = None) -> None:
        """``tokenizer`` gives the vocabulary size unless the config (or ``vocab_size``) sets it."""
        self.tokenizer = tokenizer
        size = vocab_size if vocab_size is not None else (tokenizer.vocab_size if tokenizer is not None else None)
        name = config.name if isinstance(config, DecoderConfig) else str(dict(config).get("name", "llama"))
        if name not in PRESETS:
            raise ValueError(f"{name!r} is not a decoder preset ({', '.join(PRESETS)})")
        # build() reads hyperparameters only; the preset's name is kept as given.
        self.config = dataclasses.replace(build(DecoderConfig, config, name, size), name=name)
        self.name = name
        self.inverse_frequencies = rope.inverse_frequencies(self.config)
        self.rope_scale = rope.attention_factor(self.config)

    # ---- parameters ------------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """``embed``, ``layers.<i>.*`` (``attn_norm``, ``attn.{q,k,v,o}``, ``post_attn_norm``,
        ``mlp_norm``, ``mlp.{gate,up,down}``, ``post_mlp_norm``), ``norm`` and, untied, ``head``."""
        c = self.config
        std, width, q_width, kv_width = c.initializer_range, c.hidden_size, c.num_attention_heads * c.head_size, \
            c.num_key_value_heads * c.head_size
        specs: dict[str, ParamSpec] = {}
        add_specs(specs, "embed", layers.embedding_specs(c.vocab_size, width, std))
        for i in range(c.num_hidden_layers):
            at = f"layers.{i}"
            add_specs(specs, f"{at}.attn_norm", layers.rms_norm_specs(width))
            add_specs(specs, f"{at}.attn.q", layers.linear_specs(width, q_width, c.attention_bias, std))
            add_specs(specs, f"{at}.attn.k", layers.linear_specs(width, kv_width, c.attention_bias, std))
            add_specs(specs, f"{at}.attn.v", layers.linear_specs(width, kv_width, c.attention_bias, std))
            add_specs(specs, f"{at}.attn.o", layers.linear_specs(q_width, width, c.attention_output_bias, std))
            if c.post_norms:
                add_specs(specs, f"{at}.post_attn_norm", layers.rms_norm_specs(width))
            add_specs(specs, f"{at}.mlp_norm", layers.rms_norm_specs(width))
            add_specs(specs, f"{at}.mlp.gate", layers.linear_specs(width, c.intermediate_size, c.mlp_bias, std))
            add_specs(specs, f"{at}.mlp.up", layers.linear_specs(width, c.intermediate_size, c.mlp_bias, std))
            add_specs(specs, f"{at}.mlp.down", layers.linear_specs(c.intermediate_size, width, c.mlp_bias, std))
            if c.post_norms:
                add_specs(specs, f"{at}.post_mlp_norm", layers.rms_norm_specs(width))
        add_specs(specs, "norm", layers.rms_norm_specs(width))
        if not c.tie_word_embeddings:
            add_specs(specs, "head", layers.linear_specs(width, c.vocab_size, bias=False, std=std))
        return specs

    def blocks(self) -> list[str]:
        """``layers.<i>``: each decoder block is one unit of sharding and recomputation."""
        return [f"layers.{i}" for i in range(self.config.num_hidden_layers)]

    # ---- positions -------------------------------------------------------------------------
    def rotary(self, k: Any, positions: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (rotary_dim / 2,)`` for int64 ``positions``.

        Angles are computed in float32 at least (float64 for float64 weights): half-precision angles
        lose the phase within a few hundred positions."""
        wide = "float64" if dtype == "float64" else "float32"
        shape = k.shape(positions)
        frequencies = k.reshape(k.asarray(self.inverse_frequencies, wide),
                                (1,) * len(shape) + (len(self.inverse_frequencies),))
        angles = k.mul(k.reshape(k.cast(positions, wide), tuple(shape) + (1,)), frequencies)
        cos, sin = k.cos(angles), k.sin(angles)
        if self.rope_scale != 1.0:
            cos, sin = k.mul(cos, self.rope_scale), k.mul(sin, self.rope_scale)
        return k.cast(cos, dtype), k.cast(sin, dtype)

    # ---- the network -----------------------------------------------------------------------
    def embed(self, k: Any, params: Mapping[str, Any], tokens: Tensor) -> Tensor:
        """Token embeddings ``(B, S, hidden)``."""
        return layers.embedding(k, Scope(params, "embed"), tokens)

    def logits(self, k: Any, params: Mapping[str, Any], x: Tensor) -> Tensor:
        """The final norm and the head (the embedding table when tied): ``(B, S, vocab)``."""
        c = self.config
        x = layers.rms_norm(k, Scope(params, "norm"), x, c.rms_norm_eps)
        table = params["embed.weight"] if c.tie_word_embeddings else params["head.weight"]
        return k.linear(x, table)

    def block(self, k: Any, scope: Scope, x: Tensor, cos: Tensor, sin: Tensor,
              cache: tuple[Tensor, Tensor] | None = None, write: Tensor | None = None,
              mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """One block. Without ``cache``: causal self-attention over ``x``. With it: the new keys and
        values are written where ``write`` says (see :meth:`write_cache`), and queries attend to the
        cache through the bool ``mask`` ``(B, 1, n, L)``."""
        c = self.config
        attn = scope.sub("attn")
        h = layers.rms_norm(k, scope.sub("attn_norm"), x, c.rms_norm_eps)
        q = layers.split_heads(k, layers.linear(k, attn.sub("q"), h), c.num_attention_heads)
        key = layers.split_heads(k, layers.linear(k, attn.sub("k"), h), c.num_key_value_heads)
        value = layers.split_heads(k, layers.linear(k, attn.sub("v"), h), c.num_key_value_heads)
        q = k.rotary_embedding(q, cos, sin, interleaved=c.rope_interleaved)
        key = k.rotary_embedding(key, cos, sin, interleaved=c.rope_interleaved)
        updated = None
        if cache is None:
            out = k.attention(q, key, value, causal=True)
        else:
            key, value = (self.write_cache(k, old, new, write) for old, new in zip(cache, (key, value)))
            updated = (key, value)
            out = k.attention(q, key, value, mask=mask)
        h = layers.linear(k, attn.sub("o"), layers.merge_heads(k, out))
        if c.post_norms:
            h = layers.rms_norm(k, scope.sub("post_attn_norm"), h, c.rms_norm_eps)
        x = k.add(x, h)
        h = layers.rms_norm(k, scope.sub("mlp_norm"), x, c.rms_norm_eps)
        mlp = scope.sub("mlp")
        h = k.mul(k.silu(layers.linear(k, mlp.sub("gate"), h)), layers.linear(k, mlp.sub("up"), h))
        h = layers.linear(k, mlp.sub("down"), h)
        if c.post_norms:
            h = layers.rms_norm(k, scope.sub("post_mlp_norm"), h, c.rms_norm_eps)
        return k.add(x, h), updated

    @staticmethod
    def write_cache(k: Any, old: Tensor, new: Tensor, write: Tensor) -> Tensor:
        """``old`` ``(B, Hkv, L, D)`` with the slots ``write`` marks replaced by ``new`` ``(B, Hkv, n, D)``.

        One new token (``write`` bool ``(B, 1, L, 1)``): a ``where`` that broadcasts it to its slot.
        Several (``write`` a float one-hot ``(B, 1, L, n)``): a product with the one-hot moves each
        new row to its slot exactly (one term is non-zero). Either way every shape stays static."""
        if k.dtype(write) == "bool":
            return k.where(write, new, old)
        placed = k.matmul(k.cast(write, k.dtype(new)), new)
        taken = k.greater(k.sum(write, axis=-1, keepdims=True), 0.0)
        return k.where(taken, placed, old)

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Tensor:
        """Next-token logits ``(B, S, vocab)`` for ``batch["tokens"]`` ``(B, S)`` at positions ``0 .. S - 1``."""
        tokens = batch["tokens"]
        x = self.embed(k, params, tokens)
        cos, sin = self.rotary(k, k.arange(k.shape(tokens)[1]), k.dtype(x))
        for i in range(self.config.num_hidden_layers):
            # A unit an engine may shard or recompute (Scope.run); x is its one differentiated input.
            x = Scope(params, f"layers.{i}").run(lambda scope, h: self.block(k, scope, h, cos, sin)[0], x)
        return self.logits(k, params, x)

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
             training: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy of ``batch["targets"]`` (the next token at each position, -100 where
        none counts), and ``token_accuracy`` over the same targets."""
        logits = self.forward(k, params, batch, training)
        batch_size, length, vocab = k.shape(logits)
        flat = k.reshape(logits, (batch_size * length, vocab))
        targets = k.reshape(batch["targets"], (batch_size * length,))
        loss = k.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)
        dtype = k.dtype(flat)
        hits = k.sum(k.cast(k.equal(k.argmax(flat, axis=-1), targets), dtype))
        counted = k.sum(k.cast(k.greater(targets, IGNORE_INDEX), dtype))
        return loss, {"token_accuracy": k.div(hits, k.maximum(counted, 1.0))}

    # ---- export ----------------------------------------------------------------------------
    def export_graphs(self, params: Mapping[str, Any], host_batch: Mapping[str, Any]) -> list[Any]:
        """The KV-cache step graph (see :mod:`isthmus.models.decoder_lm.export_check`)."""
        from isthmus.models.decoder_lm.export_check import step_graph

        return [step_graph(self, params, host_batch)]

    def export_checks(self, backend: Any, params: Mapping[str, Any], run_file: Any, host_batch: Mapping[str, Any],
                      tolerance: float, graphs: Mapping[str, Any] | None = None) -> list[Any]:
        """Greedy generation through the exported step graph equals the source backend's."""
        from isthmus.models.decoder_lm.export_check import STEP, generation_check

        if not graphs or STEP not in graphs:
            return []
        return [generation_check(self, backend, params, host_batch, graphs[STEP])]

    # ---- generation ------------------------------------------------------------------------
    def empty_cache(self, k: Any, batch_size: int, length: int, dtype: str = "float32") -> Cache:
        """Zeroed keys and values ``(B, Hkv, length, head_dim)`` for every layer."""
        c = self.config
        shape = (batch_size, c.num_key_value_heads, length, c.head_size)
        return [(k.zeros(shape, dtype), k.zeros(shape, dtype)) for _ in range(c.num_hidden_layers)]

    def step(self, k: Any, params: Mapping[str, Any], tokens: Tensor, positions: Tensor,
             cache: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Cache]:
        """Logits ``(B, n, vocab)`` of ``tokens`` ``(B, n)`` whose first token is at int64
        ``positions`` ``(B, 1)``, and the cache with their keys and values written in."""
        batch_size, count = k.shape(tokens)
        length = k.shape(cache[0][0])[2]
        x = self.embed(k, params, tokens)
        at = k.add(positions, k.reshape(k.arange(count), (1, count)))  # (B, n)
        cos, sin = self.rotary(k, at, k.dtype(x))
        half = len(self.inverse_frequencies)  # a fixed size, so a dynamic batch stays the only dynamic dim
        cos, sin = (k.reshape(t, (batch_size, 1, count, half)) for t in (cos, sin))
        slots = k.reshape(k.arange(length), (1, 1, 1, length))
        mine = k.reshape(at, (batch_size, 1, count, 1))
        if count == 1:  # decoding: the slot of the one new token, (B, 1, L, 1)
            write = k.equal(k.reshape(slots, (1, 1, length, 1)), mine)
        else:  # a prompt: one-hot (B, 1, L, n)
            write = k.transpose(k.cast(k.equal(slots, mine), k.dtype(x)), (0, 1, 3, 2))
        mask = k.less(slots, k.add(mine, 1))  # (B, 1, n, L): every slot up to the token's own
        updated: Cache = []
        for i in range(self.config.num_hidden_layers):
            x, kv = self.block(k, Scope(params, f"layers.{i}"), x, cos, sin, cache[i], write, mask)
            updated.append(kv)
        return self.logits(k, params, x), updated

    def generate(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], max_new_tokens: int = 16,
                 use_cache: bool = True, **options: Any) -> Tensor:
        """Greedy continuation of ``batch["tokens"]`` ``(B, P)``: int64 ``(B, max_new_tokens)``, all on
        the device (kernels only). Sampling and stopping at ``<eos>`` live in
        :mod:`isthmus.models.decoder_lm.generation`, which draws on the host."""
        if options:
            raise ValueError(f"{self.name} generate takes max_new_tokens and use_cache, not {', '.join(options)}")
        tokens = batch["tokens"]
        batch_size, prompt = k.shape(tokens)
        produced = []
        if use_cache:
            cache = self.empty_cache(k, batch_size, prompt + max_new_tokens, k.dtype(params["embed.weight"]))
            feed, position = tokens, k.zeros((batch_size, 1), "int64")
            for step in range(max_new_tokens):
                logits, cache = self.step(k, params, feed, position, cache)
                feed = k.reshape(k.argmax(k.take(logits, -1, axis=1), axis=-1), (batch_size, 1))
                position = k.full((batch_size, 1), prompt + step, "int64")
                produced.append(feed)
        else:
            for _ in range(max_new_tokens):
                logits = self.forward(k, params, {"tokens": tokens})
                chosen = k.reshape(k.argmax(k.take(logits, -1, axis=1), axis=-1), (batch_size, 1))
                tokens = k.concat([tokens, chosen], axis=1)
                produced.append(chosen)
        return k.concat(produced, axis=1) if produced else k.zeros((batch_size, 0), "int64")


__all__ = ["DecoderLM"]
