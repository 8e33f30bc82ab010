"""tiny-captioner written by hand in MindSpore, and the two ways MindSpore's tutorials train it: the
baselines of ``bench/mindspore_overhead.py``.

``CellCaptioner``: ``mindspore.nn`` / ``mindspore.ops`` only (``nn.Conv2d`` patch embed,
``nn.Embedding``, ``nn.LayerNorm``, ``nn.Dense``, attention with the prefix-LM bool mask and rotary
halves as ``isthmus.models.captioner.model`` / ``isthmus.nn.layers`` define them, erf GELU, untied
head; rotary tables and mask built once). Weights are copied from isthmus's ``initialise`` by
canonical name (:data:`RENAMES`).

Training, per mode: PyNative (:func:`hand_trainer`): ``mindspore.value_and_grad`` over the
optimizer's parameters, ``ops.clip_by_global_norm``, the optimizer. Graph (:func:`graph_trainer`):
an ``nn.TrainOneStepCell`` whose ``construct`` adds the clipping (forward, ``GradOperation``, clip,
optimizer: one graph), called in ``GRAPH_MODE``. Optimizer: ``mindspore.experimental.optim.AdamW``
+ its ``LambdaLR`` (torch's AdamW semantics, which isthmus's ``adamw_update`` follows) or
``nn.AdamWeightDecay`` with the per-step lr list (MindSpore's classic AdamW, no bias correction).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from common import lr_schedule

IGNORE_INDEX = -100


def build_cell_classes():
    import mindspore as ms
    from mindspore import nn, ops

    def rotate(x, cos, sin):
        half = cos.shape[-1]
        a, b = x[..., :half], x[..., half:]
        return ops.cat([a * cos - b * sin, a * sin + b * cos], -1)

    class Attention(nn.Cell):
        def __init__(self, dim, n_heads):
            super().__init__()
            self.n_heads = n_heads
            self.scale = 1.0 / math.sqrt(dim // n_heads)
            self.qkv = nn.Dense(dim, 3 * dim)
            self.proj = nn.Dense(dim, dim)

        def construct(self, x, rope=None, mask=None):
            batch, seq, dim = x.shape
            q, k, v = (ops.transpose(ops.reshape(t, (batch, seq, self.n_heads, dim // self.n_heads)), (0, 2, 1, 3))
                       for t in ops.split(self.qkv(x), dim, axis=-1))
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale
            if mask is not None:
                scores = ops.masked_fill(scores, ops.logical_not(mask), -math.inf)
            out = ops.matmul(ops.softmax(scores, -1), v)
            return self.proj(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (batch, seq, dim)))

    class MLP(nn.Cell):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1 = nn.Dense(dim, hidden)
            self.fc2 = nn.Dense(hidden, dim)

        def construct(self, x):
            return self.fc2(ops.gelu(self.fc1(x), approximate="none"))

    class Block(nn.Cell):
        def __init__(self, dim, n_heads, hidden, eps):
            super().__init__()
            self.norm1 = nn.LayerNorm((dim,), epsilon=eps)
            self.attn = Attention(dim, n_heads)
            self.norm2 = nn.LayerNorm((dim,), epsilon=eps)
            self.mlp = MLP(dim, hidden)

        def construct(self, x, rope=None, mask=None):
            x = x + self.attn(self.norm1(x), rope, mask)
            return x + self.mlp(self.norm2(x))

    class Vision(nn.Cell):
        def __init__(self, c):
            super().__init__()
            d = c.d_model
            self.patch = nn.Conv2d(c.channels, d, c.patch_size, stride=c.patch_size, pad_mode="valid", has_bias=True)
            self.position = nn.Embedding(c.num_patches, d)
            self.blocks = nn.CellList([Block(d, c.n_heads, c.mlp_ratio * d, c.norm_eps) for _ in range(c.n_layers_vision)])
            self.norm = nn.LayerNorm((d,), epsilon=c.norm_eps)

        def construct(self, images):
            x = self.patch(images)
            x = ops.transpose(ops.reshape(x, (x.shape[0], x.shape[1], -1)), (0, 2, 1)) + self.position.embedding_table
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    class Text(nn.Cell):
        def __init__(self, c):
            super().__init__()
            d = c.d_model
            self.embed = nn.Embedding(c.vocab_size, d)
            self.blocks = nn.CellList([Block(d, c.n_heads, c.mlp_ratio * d, c.norm_eps) for _ in range(c.n_layers_text)])
            self.norm = nn.LayerNorm((d,), epsilon=c.norm_eps)
            self.head = nn.Dense(d, c.vocab_size, has_bias=False)

    class CellCaptioner(nn.Cell):
        """tiny-captioner as a MindSpore Cell; ``c`` is an ``isthmus.models.captioner.model.CaptionerConfig``."""

        def __init__(self, c, max_text):
            super().__init__()
            if c.mlp != "gelu" or c.norm != "layer" or c.dropout:
                raise ValueError("the hand-written baseline covers mlp=gelu, norm=layer, dropout=0 only")
            self.prefix = c.num_patches
            self.vision = Vision(c)
            self.text = Text(c)
            total = self.prefix + max_text
            half = c.d_model // c.n_heads // 2
            angles = (np.arange(total, dtype=np.float32)[:, None]
                      * np.exp(np.arange(half, dtype=np.float32) * np.float32(-2.0 * math.log(10_000.0) / (2 * half)))[None, :])
            self.rope_cos, self.rope_sin = ms.Tensor(np.cos(angles)), ms.Tensor(np.sin(angles))
            i = np.arange(total)
            # Query i may attend key j iff j < max(i + 1, prefix): bidirectional prefix, causal text.
            self.mask = ms.Tensor(i[None, :] < np.maximum(i[:, None] + 1, self.prefix))

        def construct(self, images, tokens):
            image_tokens = self.vision(images)
            total = self.prefix + tokens.shape[1]
            x = ops.cat([image_tokens, self.text.embed(tokens)], 1)
            rope = (self.rope_cos[:total], self.rope_sin[:total])
            mask = self.mask[:total, :total]
            for block in self.text.blocks:
                x = block(x, rope, mask)
            return self.text.head(self.text.norm(x[:, self.prefix:]))

        def loss(self, images, tokens, targets):
            logits = self(images, tokens)
            return ops.cross_entropy(ops.reshape(logits, (-1, logits.shape[-1])), ops.reshape(targets, (-1,)),
                                     ignore_index=IGNORE_INDEX)

    class WithLoss(nn.Cell):
        """``CellCaptioner.loss`` as a cell's ``construct``: what ``TrainOneStepCell`` wraps."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, images, tokens, targets):
            logits = self.net(images, tokens)
            return ops.cross_entropy(ops.reshape(logits, (-1, logits.shape[-1])), ops.reshape(targets, (-1,)),
                                     ignore_index=IGNORE_INDEX)

    class ClippedTrainStep(nn.TrainOneStepCell):
        """``nn.TrainOneStepCell`` with global-norm clipping between the gradients and the update."""

        def __init__(self, network, optimizer, clip):
            super().__init__(network, optimizer)
            self.clip = clip

        def construct(self, *inputs):
            loss = self.network(*inputs)
            sens = ops.fill(loss.dtype, loss.shape, self.sens)
            grads = self.grad(self.network, self.weights)(*inputs, sens)
            self.optimizer(ops.clip_by_global_norm(grads, self.clip))
            return loss

    CellCaptioner.WithLoss, CellCaptioner.ClippedTrainStep = WithLoss, ClippedTrainStep
    return CellCaptioner


# MindSpore's own parameter names for the canonical (torch-style) ones isthmus uses.
RENAMES = {"norm1.weight": "norm1.gamma", "norm1.bias": "norm1.beta", "norm2.weight": "norm2.gamma",
           "norm2.bias": "norm2.beta", "norm.weight": "norm.gamma", "norm.bias": "norm.beta",
           "position.weight": "position.embedding_table", "embed.weight": "embed.embedding_table"}


def cell_name(canonical: str) -> str:
    for suffix, replacement in RENAMES.items():
        if canonical.endswith(suffix):
            return canonical[: -len(suffix)] + replacement
    return canonical


def hand_model(run, arrays: dict[str, np.ndarray]):
    import mindspore as ms

    model = build_cell_classes()(run.model.config, run.data.train.max_len)
    params = dict(model.parameters_and_names())
    wanted = {cell_name(name): name for name in arrays}
    if set(params) != set(wanted):
        raise SystemExit(f"parameter names differ: only isthmus {sorted(set(wanted) - set(params))}, "
                         f"only MindSpore {sorted(set(params) - set(wanted))}")
    for name, param in params.items():
        array = arrays[wanted[name]]
        if tuple(param.shape) != array.shape:
            raise SystemExit(f"{name}: MindSpore shape {tuple(param.shape)} != isthmus {array.shape}")
        param.set_data(ms.Tensor(array.copy()))
    return model


def optimizer_and_schedule(run, params, optimizer_kind: str):
    """The optimizer over ``params`` (decay on matrices only) and its scheduler (None for
    ``adamweightdecay``, whose lr list is the schedule)."""
    from mindspore import nn

    t = run.config.train
    # The usual rule: decay matrices (weights, embeddings, conv kernels), not biases or norm scales.
    decay = [p for p in params if len(p.shape) >= 2]
    no_decay = [p for p in params if len(p.shape) < 2]
    lrs = lr_schedule(run)
    if optimizer_kind == "adamw":
        from mindspore.experimental import optim

        optimizer = optim.AdamW(
            [{"params": decay, "weight_decay": float(t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(t.lr), betas=tuple(float(b) for b in t.betas), eps=float(t.eps))
        # LambdaLR asks for epoch e (a Tensor) before step e + 1; the factor is isthmus's lr over the base.
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, lambda e: lrs[min(int(e), len(lrs) - 1)] / float(t.lr))
    else:
        optimizer = nn.AdamWeightDecay(
            [{"params": decay, "weight_decay": float(t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            learning_rate=lrs, beta1=float(t.betas[0]), beta2=float(t.betas[1]), eps=float(t.eps))
        scheduler = None
    return optimizer, scheduler


def hand_trainer(run, model, optimizer_kind: str):
    """The MindSpore tutorial's PyNative training step: returns step(host batch) -> loss (a Tensor),
    and the ``value_and_grad`` function it uses."""
    import mindspore as ms
    from mindspore import ops

    optimizer, scheduler = optimizer_and_schedule(run, model.trainable_params(), optimizer_kind)
    grad_fn = ms.value_and_grad(model.loss, None, optimizer.parameters)
    clip = float(run.config.train.clip_norm)

    def step(batch):
        loss, grads = grad_fn(ms.Tensor(batch["images"]), ms.Tensor(batch["tokens"]), ms.Tensor(batch["targets"]))
        optimizer(ops.clip_by_global_norm(grads, clip))
        if scheduler is not None:
            scheduler.step()
        return loss

    return step, grad_fn


def graph_trainer(run, model, optimizer_kind: str):
    """The graph-mode training step: forward, gradients, clipping and the optimizer as one
    ``ClippedTrainStep`` graph; returns step(host batch) -> loss. Call it in ``GRAPH_MODE``
    (:func:`graph_mode`)."""
    import mindspore as ms

    net = type(model).WithLoss(model)
    optimizer, scheduler = optimizer_and_schedule(run, net.trainable_params(), optimizer_kind)
    cell = type(model).ClippedTrainStep(net, optimizer, float(run.config.train.clip_norm))
    cell.set_train(True)

    def step(batch):
        loss = cell(ms.Tensor(batch["images"]), ms.Tensor(batch["tokens"]), ms.Tensor(batch["targets"]))
        if scheduler is not None:
            scheduler.step()
        return loss

    return step


@contextlib.contextmanager
def graph_mode():
    """MindSpore's ``GRAPH_MODE`` within (the isthmus engine keeps its process in PyNative)."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
