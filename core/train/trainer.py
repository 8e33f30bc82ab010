"""The training loop, engine-neutral: precision, accumulation, clipping, schedule, NaN policy,
evaluation, metrics, checkpoints and resume, with trainer events sent to plugins."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np

from isthmus.train.checkpoint import CheckpointState, load_checkpoint, load_sharded_state, save_checkpoint
from isthmus.train.sidecar import interpreting
from isthmus.errors import IsthmusError
from isthmus.train.evaluate import to_device
from isthmus.nn.params import manifest
from isthmus.nn.optim import AdamW, clip_by_global_norm, learning_rate
from isthmus.train.parallel import NullLog, QuietProgress, RankSlice, token_count
from isthmus.nn.precision import Policy
from isthmus.train.run import Run, plain
from isthmus.train.runlog import MetricsLog, Progress, plot_loss
from isthmus.train.step import whole_step

EVAL_SAMPLES_DURING_TRAINING = 128


class RecomputeError(IsthmusError):
    """``train.recompute=true`` on an engine that cannot recompute activations."""


class TrainingStopped(IsthmusError):
    """The NaN/inf policy ``stop`` ended the run; the message names the step and the value."""


@dataclass
class TrainResult:
    """What a run did, for the CLI and the ``on_train_end`` event."""

    run_dir: Path
    steps: int
    final_loss: float
    skipped_steps: int
    wall_s: float
    steps_per_s: float
    evaluation: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped: str = ""


class Trainer:
    """Trains ``run.model`` on ``run.backend``; ``resume`` is a checkpoint path or run dir; ``init``
    the starting weights of a new run (a fresh optimizer), instead of the seeded initialisation."""

    def __init__(self, run: Run, run_dir: Path, manager: Any = None, progress: bool = False, resume: Path | None = None,
                 comm: Any = None, init: Mapping[str, np.ndarray] | None = None,
                 foreign: Mapping[str, Any] | None = None, after_checkpoint: Callable[[Path], None] | None = None) -> None:
        """``after_checkpoint(path)`` is called after each complete checkpoint (the run directory's
        change is committed on the first, see :class:`isthmus.train.rundir.RunDirChange`)."""
        self.run = run
        self.cfg = run.config
        self.run_dir = run_dir
        self.manager = manager
        self.show_progress = progress
        self.resume = resume
        self.init = init  # starting weights (train --init-from): float32 arrays by parameter name
        # What the init checkpoint kept of a foreign source (its Hugging Face config and dtypes), so
        # this run's checkpoints convert back to the same layout.
        self.foreign = dict(foreign or {})
        self.policy = Policy(str(self.cfg.train.precision))
        # The train section as plain values for the per-step path: an OmegaConf attribute read
        # costs ~20 us and the loop reads about a dozen per step.
        self.train_cfg = SimpleNamespace(**plain(self.cfg.train))
        self.specs = run.model.param_specs()
        self.step = 0
        self.skipped = 0
        # Data parallel (isthmus.train.parallel.Comm or None): only rank 0 writes checkpoints, logs and progress.
        self.comm = comm
        self.writer = comm is None or comm.rank == 0
        # Fully sharded (distributed=fsdp): the engine's Sharded places, steps and checkpoints the model.
        self.sharded = comm if comm is not None and getattr(comm, "strategy", "ddp") == "fsdp" else None
        self.after_checkpoint = after_checkpoint
        self.started = False

    # -- events --------------------------------------------------------------------------
    def emit(self, event: str, **kwargs: Any) -> None:
        if self.manager is not None:  # a plugin's failure, even sys.exit(), is named as the plugin's
            from isthmus.registry.manager import call_hook

            call_hook(self.manager, event, trainer=self, **kwargs)

    # -- state ---------------------------------------------------------------------------
    def start_state(self) -> None:
        """Initial weights, or the checkpoint's (verified against the model), with the optimizer,
        RNG and data position; writes nothing, so a command calls it before it touches the run
        directory. Once per trainer."""
        if self.started:
            return
        backend, t = self.run.backend, self.cfg.train
        engine, k = backend.engine, backend.kernels
        # An engine that can compile the step (cuda: torch.compile when backend.options.compile)
        # wraps the loss; it falls back to eager itself and says why in its compile_status.
        self.loss_fn = engine.compile_step(self.run.model.loss)
        self.optimizer = AdamW(betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
        # An engine that runs the whole step itself (MindSpore: compiled in graph mode) gets it
        # here; data parallel keeps the step below, which averages gradients across ranks.
        self.whole_step = (whole_step(backend, self.run.model, self.policy, self.specs, self.optimizer, self.train_cfg)
                           if self.comm is None else None)
        if bool(t.recompute) and self.sharded is None and engine.recompute(self.run.model, {}) is None:
            raise RecomputeError(f"train.recompute=true: engine {backend.engine_name} cannot recompute activations; "
                                 f"set train.recompute=false")
        if self.sharded is not None:
            self.start_sharded()
            self.started = True
            return
        if self.resume is None:
            weights = self.init if self.init is not None else self.run.model.initial_parameters(int(self.cfg.seed))
            self.params = self.run.model.place_parameters(engine, {name: weights[name] for name in self.specs})
            self.optimizer.init_state(k, self.params)
            engine.seed(int(self.cfg.seed))
            self.data = self.run.data.train.iter_batches(int(t.batch_size), seed=int(self.cfg.seed))
            self.started = True
            return
        loaded = load_checkpoint(
            self.resume,
            expect=manifest(self.specs),
            must_match={"model": plain(self.cfg.model), "data": plain(self.cfg.data)},
            model_name=self.run.model.name,
        )
        self.params = self.run.model.place_parameters(engine, loaded.params)
        if loaded.optimizer_tensors or int(loaded.state.optimizer.get("step", 0)):
            self.optimizer.load_tensors({n: engine.asarray(a) for n, a in loaded.optimizer_tensors.items()},
                                        list(self.specs))
        else:  # weights only (an `isthmus convert` output): the optimizer has not started
            self.optimizer.init_state(k, self.params)
        self.optimizer.step = int(loaded.state.optimizer["step"])
        if self.policy.loss_scale is not None and "loss_scale" in loaded.state.optimizer:
            with interpreting("optimizer.loss_scale", "the fp16 loss scale", loaded.path / "state.json"):
                self.policy.loss_scale.load(loaded.state.optimizer["loss_scale"])
        if loaded.state.rng.get("engine") == backend.engine_name:
            with interpreting("rng.state", f"engine {backend.engine_name}", loaded.path / "state.json"):
                engine.set_rng_state(loaded.state.rng["state"])
        else:
            engine.seed(int(self.cfg.seed) + loaded.state.step)
        if loaded.state.data_position:
            with interpreting("data_position", "the training data", loaded.path / "state.json"):
                self.data = self.run.data.train.resume(loaded.state.data_position)
        else:  # weights only (converted): the data starts where a new run starts
            self.data = self.run.data.train.iter_batches(int(t.batch_size), seed=int(self.cfg.seed))
        self.step = loaded.state.step
        self.skipped = int(loaded.state.extra.get("skipped_steps", 0))
        self.foreign = dict(loaded.state.extra.get("foreign") or {})
        self.started = True

    def start_sharded(self) -> None:
        """Shard the model over the ranks: from the seeded or given weights, from a whole checkpoint
        (sharded here), or from a sharded one written on any number of ranks."""
        sharded, t, engine, model = self.sharded, self.cfg.train, self.run.backend.engine, self.run.model
        compute = "float32" if model.autocast else self.policy.compute_dtype
        if self.resume is None:
            weights = self.init if self.init is not None else model.initial_parameters(int(self.cfg.seed))
            self.params = sharded.place(model, {n: weights[n] for n in self.specs}, compute, bool(t.recompute))
            self.optimizer.exp_avg, self.optimizer.exp_avg_sq = sharded.zeros()
            engine.seed(int(self.cfg.seed))
            self.data = self.run.data.train.iter_batches(int(t.batch_size), seed=int(self.cfg.seed))
            return
        ckpt, state, shards = load_sharded_state(
            self.resume, expect=manifest(self.specs),
            must_match={"model": plain(self.cfg.model), "data": plain(self.cfg.data)}, model_name=model.name)
        if shards is not None:  # its shards load over the seeded weights, resharded to this world size
            weights = model.initial_parameters(int(self.cfg.seed))
            self.params = sharded.place(model, {n: weights[n] for n in self.specs}, compute, bool(t.recompute))
            self.optimizer.exp_avg, self.optimizer.exp_avg_sq = sharded.zeros()
            sharded.read_shards(ckpt, self.optimizer)
        else:
            loaded = load_checkpoint(ckpt)
            self.params = sharded.place(model, loaded.params, compute, bool(t.recompute))
            self.optimizer.exp_avg = {n: sharded.shard(n, loaded.optimizer_tensors[f"{n}.exp_avg"]) for n in self.specs}
            self.optimizer.exp_avg_sq = {n: sharded.shard(n, loaded.optimizer_tensors[f"{n}.exp_avg_sq"])
                                         for n in self.specs}
        self.optimizer.step = int(state.optimizer["step"])
        if self.policy.loss_scale is not None and "loss_scale" in state.optimizer:
            self.policy.loss_scale.load(state.optimizer["loss_scale"])
        engine.seed(int(self.cfg.seed) + state.step)
        with interpreting("data_position", "the training data", ckpt / "state.json"):
            self.data = self.run.data.train.resume(state.data_position)
        self.step = state.step
        self.skipped = int(state.extra.get("skipped_steps", 0))
        self.foreign = dict(state.extra.get("foreign") or {})

    def save(self) -> Path | None:
        sharded = self.sharded
        whole = sharded.whole_optimizer(self.optimizer) if sharded is not None and sharded.whole_checkpoints else None
        if whole is not None:
            sharded = None  # a whole checkpoint, written by rank 0 as without sharding
        elif sharded is not None and not self.writer:
            sharded.write_shards(None, self.optimizer)  # rank 0 names the directory
            return None
        if not self.writer:
            return None
        engine = self.run.backend.engine
        optimizer_scalars = self.optimizer.scalars()
        if self.policy.loss_scale is not None:
            optimizer_scalars["loss_scale"] = self.policy.loss_scale.state()
        if sharded is not None:  # every rank writes its shards
            params, optimizer = {}, {}
        else:  # whole: the parameters as the engine holds them (a sharding one keeps them whole then)
            held = self.sharded.eval_params() if self.sharded is not None else self.params
            params = {n: engine.to_numpy(p) for n, p in held.items()}
            optimizer = whole if whole is not None else {n: engine.to_numpy(t) for n, t in self.optimizer.tensors().items()}
        path = save_checkpoint(
            self.run_dir,
            params,
            optimizer,
            CheckpointState(
                step=self.step,
                model_name=self.run.model.name,
                config=plain(self.cfg),
                engine=self.run.backend.engine_name,
                versions=engine.versions(),
                optimizer=optimizer_scalars,
                rng={"engine": self.run.backend.engine_name, "state": engine.rng_state()},
                data_position=self.data.state(),
                extra={"data": self.run.data.state(), "model_data": self.run.model.data_state(),
                       "backend": self.run.backend.name, "skipped_steps": self.skipped,
                       **({"foreign": self.foreign} if self.foreign else {})},
            ),
            keep_last=int(self.cfg.train.keep_last),
            shard_writer=(lambda tmp: sharded.write_shards(tmp, self.optimizer)) if sharded is not None else None,
        )
        if self.after_checkpoint is not None:
            self.after_checkpoint(path)
        self.emit("on_checkpoint", step=self.step, path=path)
        return path

    # -- one step ------------------------------------------------------------------------
    def train_step(self, lr: float) -> tuple[float, float, str]:
        """Returns (loss, grad norm, skip reason or '')."""
        backend, t = self.run.backend, self.train_cfg
        if self.whole_step is not None:
            batches = [to_device(backend, next(self.data)) for _ in range(int(t.grad_accum))]
            self.params, loss, norm, skip = self.whole_step(self.params, self.optimizer, self.policy, batches, lr)
            return loss, norm, skip
        k, engine, policy = backend.kernels, backend.engine, self.policy
        own = self.run.model.autocast  # the model runs the engine's autocast instead of being cast
        if self.sharded is not None:
            casts = self.sharded.casts_parameters  # else the policy casts and the engine recomputes, as here

            def loss_of(params: Any, batch: Any) -> Any:
                with engine.autocast(policy.compute_dtype) if own else nullcontext():
                    used = batch if own else policy.cast_batch(k, batch)
                    if not casts:
                        params = params if own else policy.cast_params(k, params)
                        params = engine.recompute(self.run.model, params) if t.recompute else params
                    return self.loss_fn(k, params, used, training=True)[0]

            return self.sharded.step(k, loss_of, [next(self.data) for _ in range(int(t.grad_accum))],
                                     lambda raw: to_device(backend, raw), self.optimizer, self.specs, lr,
                                     t.clip_norm, policy.loss_scale)
        recompute = bool(t.recompute)
        scale = policy.scale
        total = None
        losses = []
        weight = 0.0
        for _ in range(int(t.grad_accum)):
            raw = next(self.data)
            weight += token_count(raw) if self.comm is not None else 0.0
            batch = to_device(backend, raw) if own else policy.cast_batch(k, to_device(backend, raw))

            def objective(params: dict[str, Any]) -> tuple[Any, Any]:
                with engine.autocast(policy.compute_dtype) if own else nullcontext():
                    used = params if own else policy.cast_params(k, params)
                    if recompute:  # noqa: B023 (called at once)
                        used = engine.recompute(self.run.model, used)
                    loss, metrics = self.loss_fn(k, used, batch, training=True)  # noqa: B023 (called at once)
                return (k.mul(loss, scale) if scale != 1.0 else loss), loss

            _, loss, grads = engine.value_and_grad(objective, self.params)
            losses.append(loss)
            total = grads if total is None else {n: k.add(total[n], g) for n, g in grads.items()}
        factor = 1.0 / (int(t.grad_accum) * scale)
        if factor != 1.0:
            total = {n: k.mul(g, factor) for n, g in total.items()}
        loss_value = float(np.mean([float(engine.to_numpy(l)) for l in losses]))
        if self.comm is not None:  # data parallel: token-weighted mean of loss and gradients over ranks
            total, loss_value = self.comm.weighted_mean(k, total, loss_value, weight)
        grads, norm = clip_by_global_norm(k, total, t.clip_norm)
        norm_value = float(engine.to_numpy(norm))
        if policy.loss_scale is not None:
            policy.loss_scale.update(math.isfinite(norm_value))
            if math.isfinite(loss_value) and not math.isfinite(norm_value):
                return loss_value, norm_value, f"fp16 overflow (loss scale now {policy.loss_scale.scale:g})"
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return loss_value, norm_value, f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'}"
        with engine.no_grad():
            self.params = self.optimizer.update(k, self.params, grads, lr, self.specs)
        return loss_value, norm_value, ""

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        t = self.train_cfg
        self.start_state()
        start_step = self.step
        if self.comm is not None:  # data parallel: this rank's slice of each global batch; own dropout stream
            self.data = RankSlice(self.data, self.comm.rank, self.comm.world_size)
            if self.comm.rank:
                self.run.backend.engine.seed(int(self.cfg.seed) + 1_000_003 * self.comm.rank + start_step)
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", truncate_after_step=start_step if self.resume else None) if self.writer else NullLog()
        progress = Progress(int(t.steps), start_step, self.show_progress) if self.writer else QuietProgress()
        self.emit("on_train_start")
        # Device memory (cuda): the peak over each logging window goes into that window's row.
        memory_stats = self.run.backend.engine.memory_stats
        memory_stats()
        tokens_per_sample = self.run.data.train.tokens_per_sample
        started = window_start = time.perf_counter()
        window_steps = 0
        last_loss = float("nan")
        checkpoint = None
        stopped = ""
        try:
            while self.step < int(t.steps):
                self.step += 1
                lr = learning_rate(self.step, float(t.lr), int(t.warmup_steps), int(t.steps), str(t.schedule))
                loss, norm, skip = self.train_step(lr)
                window_steps += 1
                if skip:
                    self.skipped += 1
                    if not skip.startswith("fp16") and str(t.nan_policy) == "stop":
                        stopped = f"step {self.step}: {skip} ({loss=}, grad_norm={norm}); train.nan_policy=stop"
                        progress.print(f"stopping: {stopped}")
                        break
                    progress.print(f"step {self.step}: skipped, {skip}")
                else:
                    last_loss = loss
                row = {"split": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "skipped": bool(skip)}
                if self.policy.loss_scale is not None:
                    row["loss_scale"] = self.policy.loss_scale.scale
                if self.step % max(1, int(t.log_every)) == 0 or self.step == int(t.steps):
                    elapsed = time.perf_counter() - window_start
                    samples = window_steps * int(t.batch_size) * int(t.grad_accum)
                    row.update(steps_per_s=window_steps / elapsed, samples_per_s=samples / elapsed, tokens_per_s=samples * tokens_per_sample / elapsed)
                    row.update(memory_stats())
                    metrics_log.write(row)
                    progress.update(self.step, f"loss {loss:.4f} | {row['samples_per_s']:.0f} samples/s")
                    window_start, window_steps = time.perf_counter(), 0
                self.emit("on_step_end", step=self.step, metrics=row)
                final = self.step == int(t.steps)
                if int(t.eval_every) and self.step % int(t.eval_every) == 0 and not final:
                    self.eval_and_log(metrics_log, progress, EVAL_SAMPLES_DURING_TRAINING)
                if (int(t.checkpoint_every) and self.step % int(t.checkpoint_every) == 0) or final:
                    checkpoint = self.save()
        except BaseException:
            metrics_log.abandon()  # the error that stopped the run is the one to report
            raise
        finally:
            progress.close()
        wall = time.perf_counter() - started
        if stopped:
            metrics_log.close()
            result = TrainResult(self.run_dir, self.step, last_loss, self.skipped, wall, (self.step - start_step) / wall, {}, checkpoint, stopped)
            self.emit("on_train_end", result=result)
            raise TrainingStopped(stopped + f"; last checkpoint: {checkpoint or 'none written'}")
        evaluation = self.eval_and_log(metrics_log, progress, None)
        metrics_log.close()
        if self.writer:
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", f"{self.run.model.name} on {self.run.backend.name}/{self.run.backend.engine_name}")
        result = TrainResult(self.run_dir, self.step, last_loss, self.skipped, wall, (self.step - start_step) / max(wall, 1e-9), evaluation, checkpoint)
        self.emit("on_train_end", result=result)
        return result

    def eval_and_log(self, metrics_log: MetricsLog, progress: Progress, max_samples: int | None) -> dict[str, Any]:
        run = self.run
        final = max_samples is None
        params = self.sharded.eval_params() if self.sharded is not None else self.params
        result = run.model.evaluate(run.backend, params, run.data.eval, batch_size=128, max_samples=max_samples,
                                    policy=self.policy, final=final, out_dir=self.run_dir if self.writer else None)
        row = {"split": "eval", "step": self.step,
               **{k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        metrics_log.write(row)
        progress.print(f"step {self.step}: {result['headline']}")
        self.emit("on_eval_end", step=self.step, metrics=row)
        return result
