"""Per-step overhead of isthmus's MindSpore engine against the same model written as a plain MindSpore ``nn.Cell``.

isthmus: the real ``isthmus.train.trainer.Trainer`` with ``backend=cpu backend.engine=mindspore``, timed
by its own step-loop clock (``TrainResult.wall_s``) as ``bench/overhead.py`` times the torch one.
Hand-written: ``CellCaptioner`` below, tiny-captioner in ``mindspore.nn`` / ``mindspore.ops`` only
(``nn.Conv2d`` patch embed, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.Dense``, attention with the
prefix-LM bool mask and rotary halves as ``isthmus.models.captioner.model`` / ``isthmus.nn.layers`` define
them, erf GELU, untied head; rotary tables and mask built once), trained the way MindSpore's
tutorials do: ``mindspore.value_and_grad`` over the optimizer's parameters,
``ops.clip_by_global_norm``, then the optimizer: by default ``mindspore.experimental.optim.AdamW``
+ its ``LambdaLR`` (torch's AdamW semantics, which isthmus's ``adamw_update`` follows, so both
sides follow the same trajectory), or with ``--optimizer adamweightdecay`` ``nn.AdamWeightDecay``
with the per-step lr list (MindSpore's classic AdamW: no bias correction, so the losses drift apart
after the first update; the per-step work is alike). Decay on matrices only, isthmus's warmup +
cosine schedule; ``loss.asnumpy()`` to a JSONL file every ``log_every`` steps. Both sides start from
the same weights (isthmus's ``initialise``, copied by canonical name) and walk the same batches.

Both run in this one process, in the execution mode the engine sets: PyNative with
``launch_blocking`` (``backends/mindspore/engine.py``; the engine has no graph-mode path on CPU),
the engine's CPU thread count (``--threads``) and deterministic setting, since MindSpore keeps
these per process. A warm-up round (not counted), then ``--rounds`` rounds of isthmus then
hand-written, each run from fresh weights. Not timed: model / optimizer construction, weight init,
the trainer's final evaluation (replaced by a no-op as in overhead.py).

Before timing: the hand-written loss on the first batch must equal the loss of the isthmus
Trainer's first ``train_step`` within 1e-4 (and the global gradient norm within 1e-3), from the
same weights, or the run aborts. After each round the last logged losses of both are printed
(with the default optimizer they agree to ~1e-6). Writes ``bench/results/mindspore_overhead.json``.
Run: ``.venv-bench/bin/python bench/mindspore_overhead.py`` (or ``.venv/bin/python``: it needs nothing beyond the project).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import base_parser, isthmus_first_step, lr_schedule, machine, make_run, write_result  # noqa: E402

LOSS_TOL = 1e-4
NORM_TOL = 1e-3
IGNORE_INDEX = -100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0], rounds=3, steps=30, out=HERE / "results" / "mindspore_overhead.json")
    p.add_argument("--optimizer", choices=["adamw", "adamweightdecay"], default="adamw",
                   help="hand-written side: mindspore.experimental.optim.AdamW + LambdaLR (torch's AdamW, as "
                        "isthmus's) or nn.AdamWeightDecay with a per-step lr list (no bias correction)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the hand-written Cell (MindSpore is imported by the isthmus engine first, which quiets its log)


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

    model = build_cell_classes()(run.model.config, run.train_data.max_len)
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


def hand_trainer(run, model, optimizer_kind: str):
    """The MindSpore tutorial's training step: returns step(host batch) -> loss (a Tensor), and the
    ``value_and_grad`` function it uses."""
    import mindspore as ms
    from mindspore import nn, ops

    t = run.config.train
    # The usual rule: decay matrices (weights, embeddings, conv kernels), not biases or norm scales.
    decay = [p for p in model.trainable_params() if len(p.shape) >= 2]
    no_decay = [p for p in model.trainable_params() if len(p.shape) < 2]
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
    grad_fn = ms.value_and_grad(model.loss, None, optimizer.parameters)
    clip = float(t.clip_norm)

    def step(batch):
        loss, grads = grad_fn(ms.Tensor(batch["images"]), ms.Tensor(batch["tokens"]), ms.Tensor(batch["targets"]))
        optimizer(ops.clip_by_global_norm(grads, clip))
        if scheduler is not None:
            scheduler.step()
        return loss

    return step, grad_fn


# ---------------------------------------------------------------------------------------------


def check_agreement(run, arrays: dict[str, np.ndarray], work: Path, optimizer_kind: str) -> dict:
    import mindspore as ms
    from mindspore import ops

    loss_i, norm_i, weights = isthmus_first_step(run, work / "check")
    if any(not np.array_equal(weights[name], arrays[name]) for name in arrays):
        raise SystemExit("ABORT: the trainer's initial weights differ from initialise()")
    decay_ok = all(run.model.param_specs()[name].decay == (array.ndim >= 2) for name, array in arrays.items())
    model = hand_model(run, arrays)
    _, grad_fn = hand_trainer(run, model, optimizer_kind)
    t = run.config.train
    host = next(run.train_data.iter_batches(int(t.batch_size), seed=int(run.config.seed)))
    loss, grads = grad_fn(ms.Tensor(host["images"]), ms.Tensor(host["tokens"]), ms.Tensor(host["targets"]))
    loss = float(loss.asnumpy())
    norm = float(ops.sqrt(sum(ops.sum(g * g) for g in grads)).asnumpy())
    loss_diff, norm_diff = abs(loss - loss_i), abs(norm - norm_i)
    print(f"agreement on the first step (batch {int(t.batch_size)}, {len(arrays)} parameter tensors):")
    print(f"  loss       isthmus {loss_i:.8f}  hand-written {loss:.8f}  |diff| {loss_diff:.2e}  (tol {LOSS_TOL:g})")
    print(f"  grad norm  isthmus {norm_i:.6f}  hand-written {norm:.6f}  |diff| {norm_diff:.2e}  (tol {NORM_TOL:g})")
    print(f"  decay groups match: {decay_ok}")
    if not (loss_diff <= LOSS_TOL and norm_diff <= NORM_TOL and decay_ok):
        raise SystemExit("ABORT: the two implementations do not agree; the timing would compare different work")
    return {"loss_isthmus": loss_i, "loss_hand": loss, "loss_abs_diff": loss_diff,
            "grad_norm_isthmus": norm_i, "grad_norm_hand": norm, "grad_norm_abs_diff": norm_diff,
            "decay_groups_match": decay_ok}


def hand_run(run, arrays: dict[str, np.ndarray], log_path: Path, optimizer_kind: str) -> tuple[float, float, float, int]:
    """(wall s, CPU s, last loss, steps) of the hand-written loop, fresh model and optimizer."""
    t = run.config.train
    steps, log_every = int(t.steps), max(1, int(t.log_every))
    model = hand_model(run, arrays)
    model.set_train(True)
    step, _ = hand_trainer(run, model, optimizer_kind)
    lrs = lr_schedule(run)
    data = run.train_data.iter_batches(int(t.batch_size), seed=int(run.config.seed))
    last = float("nan")
    gc.collect()
    with open(log_path, "w", encoding="utf-8") as log:
        start, cpu_start = time.perf_counter(), time.process_time()
        for n in range(1, steps + 1):
            loss = step(next(data))
            if n % log_every == 0 or n == steps:
                last = float(loss.asnumpy())
                log.write(json.dumps({"split": "train", "step": n, "loss": last, "lr": lrs[n - 1]}) + "\n")
                log.flush()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall, cpu, last, steps


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    from isthmus.nn.params import initialise
    from overhead import isthmus_run

    work = Path(tempfile.mkdtemp(prefix="isthmus-ms-overhead-"))
    run, _ = make_run(args, work / "isthmus", engine="mindspore")
    import mindspore as ms

    mode = "PyNative" if ms.get_context("mode") == ms.PYNATIVE_MODE else "graph"
    print(f"setup {time.perf_counter() - started:.1f}s: {run.model.name}, {len(run.train_data)} training samples, "
          f"batch {args.batch_size}, {args.steps} steps per run, MindSpore {ms.__version__} {mode} mode, "
          f"{args.threads} CPU kernel threads, deterministic {ms.get_context('deterministic')}")
    arrays = initialise(run.model.param_specs(), int(run.config.seed))
    agreement = check_agreement(run, arrays, work, args.optimizer)

    rows = []
    print(f"\n{'round':>7} | {'steps/s (wall)':^26} | {'steps/s (CPU time)':^26} | last loss")
    print(f"{'':>7} | {'isthmus':>8} {'hand':>8} {'ratio':>8} | {'isthmus':>8} {'hand':>8} {'ratio':>8} | isthmus / hand")
    for r in range(args.rounds + 1):
        wall_i, cpu_i, loss_i, n_i = isthmus_run(run, work / f"isthmus-{r}")
        wall_h, cpu_h, loss_h, n_h = hand_run(run, arrays, work / f"hand-{r}.jsonl", args.optimizer)
        assert n_i == n_h == args.steps, (n_i, n_h)
        row = {"round": r, "isthmus_steps_per_s": n_i / wall_i, "hand_steps_per_s": n_h / wall_h,
               "ratio": wall_h / wall_i, "isthmus_cpu_steps_per_s": n_i / cpu_i, "hand_cpu_steps_per_s": n_h / cpu_h,
               "cpu_ratio": cpu_h / cpu_i, "isthmus_wall_s": wall_i, "hand_wall_s": wall_h,
               "last_loss_isthmus": loss_i, "last_loss_hand": loss_h}
        print(f"{'warm-up' if r == 0 else r:>7} | {row['isthmus_steps_per_s']:8.2f} {row['hand_steps_per_s']:8.2f} "
              f"{row['ratio']:8.3f} | {row['isthmus_cpu_steps_per_s']:8.2f} {row['hand_cpu_steps_per_s']:8.2f} "
              f"{row['cpu_ratio']:8.3f} | {loss_i:.6f} / {loss_h:.6f}", flush=True)
        if r:
            rows.append(row)

    med_i = statistics.median(r["isthmus_steps_per_s"] for r in rows)
    med_h = statistics.median(r["hand_steps_per_s"] for r in rows)
    cpu_i = statistics.median(r["isthmus_cpu_steps_per_s"] for r in rows)
    cpu_h = statistics.median(r["hand_cpu_steps_per_s"] for r in rows)
    summary = {"median_isthmus": med_i, "median_hand": med_h, "ratio_of_medians": med_i / med_h,
               "ratio_of_sums": sum(r["hand_wall_s"] for r in rows) / sum(r["isthmus_wall_s"] for r in rows),
               "median_cpu_isthmus": cpu_i, "median_cpu_hand": cpu_h, "cpu_ratio_of_medians": cpu_i / cpu_h}
    print(f"{'median':>7} | {med_i:8.2f} {med_h:8.2f} {med_i / med_h:8.3f} | {cpu_i:8.2f} {cpu_h:8.2f} {cpu_i / cpu_h:8.3f} |")
    print(f"ratio isthmus / hand-written MindSpore: {summary['ratio_of_medians']:.3f} (of medians), "
          f"{summary['ratio_of_sums']:.3f} (of sums), CPU time {summary['cpu_ratio_of_medians']:.3f}")
    drift = max(abs(r["last_loss_isthmus"] - r["last_loss_hand"]) for r in rows)
    if args.optimizer == "adamw" and drift > 1e-3:
        print(f"WARNING: the last losses of the two loops drifted apart by {drift:.2e} (same optimizer semantics: expect ~1e-6)")
    load = os.getloadavg()
    wall = time.perf_counter() - started
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; wall time {wall:.0f}s")

    write_result(args.out, {
        "settings": {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size,
                     "threads": args.threads, "precision": args.precision, "mode": mode, "optimizer": args.optimizer,
                     "warmup_steps": int(run.config.train.warmup_steps), "num_train": len(run.train_data),
                     "deterministic": str(ms.get_context("deterministic")), "order_in_round": ["isthmus", "hand"]},
        "machine": machine(load, mindspore=ms.__version__),
        "agreement": agreement,
        "rounds": rows,
        "summary": summary,
        "last_loss_max_abs_diff": drift,
        "wall_s": wall,
    })
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
