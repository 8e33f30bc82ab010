"""The MindSpore engine's runner for a whole train step (:class:`isthmus.train.step.TrainStep`).

Graph mode: the objective (the model's loss) is traced into a graph and differentiated by
``mindspore.value_and_grad``, which runs the graph's backward as a graph too; the update (gradient
sum, unscaling, clipping, AdamW, the loss-scale rule) is a second graph. PyNative mode: the
objective runs op by op and only the update is compiled, as MindSpore's own optimizers compile
theirs. Two graphs per step rather than one: MindSpore 2.10 compiles the gradient of a traced
graph and the traced update into one AST graph only under NumPy 1.x (under NumPy 2 its compiler's
NumPy C-API import fails, "Numpy init failed"), and that one graph measured no faster on the CPU
(bench/README.md, mindspore_overhead).

Every call reads one small vector back (the losses, the gradient norm and the loss scale): the
trainer needs the loss and norm on the host every step anyway, and skipping a step is then a
matter of keeping the old tensors (:class:`isthmus.train.step.WholeStep`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from isthmus.backends.mindspore.engine import ms, ops
from isthmus.backends.mindspore.graph import Traced, compile_failure


class MindSporeStepRunner:
    """:class:`isthmus.train.step.StepRunner` for ``step`` on ``engine``; ``compiled_objective``:
    graph mode (else PyNative)."""

    def __init__(self, engine: Any, step: Any, compiled_objective: bool) -> None:
        self.engine, self.step, self.names = engine, step, list(step.names)
        self.compiled_objective = compiled_objective
        self.label = f"model {step.name}"
        self.objectives: dict[Any, tuple[Traced, Any]] = {}
        self.updates: dict[Any, Traced] = {}
        level = engine.execution.jit_level
        self.description = (f"graph (mindspore.jit trace, jit_level {level}): objective and update compiled"
                            if compiled_objective else f"pynative (update compiled, jit_level {level})")

    def __call__(self, params: Mapping[str, Any], exp_avg: Mapping[str, Any], exp_avg_sq: Mapping[str, Any],
                 batches: Sequence[Mapping[str, Any]], hyper: Sequence[float]
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], np.ndarray]:
        names = self.names
        p = [params[n] for n in names]
        dtype = p[0].dtype if p else ms.float32
        scale = ms.Tensor(float(hyper[3]), ms.float32) if self.step.loss_scaling else None
        grads, losses = [], []
        for batch in batches:
            loss, g = self.objective(p, batch, scale)
            grads.append(g)
            losses.append(loss)
        # mutable: a tuple of tensors is otherwise a constant of the AST graph, recompiled per call.
        groups = [ms.mutable(tuple(p)), ms.mutable(tuple(exp_avg[n] for n in names)),
                  ms.mutable(tuple(exp_avg_sq[n] for n in names)), ms.mutable(tuple(t for g in grads for t in g)),
                  ms.mutable(tuple(losses)), ms.Tensor(np.asarray(hyper, np.float64), dtype)]
        update = self.updates.get(len(batches))
        if update is None:
            update = self.updates[len(batches)] = self._compile_update(len(batches), groups)
        out = update[0].run(update[1], groups)
        n = len(names)
        stats = np.asarray(out[3 * n].asnumpy(), dtype=np.float64)
        return dict(zip(names, out[:n])), dict(zip(names, out[n:2 * n])), dict(zip(names, out[2 * n:3 * n])), stats

    # ---- the objective: loss and gradients of one micro-batch
    def objective(self, p: list[Any], batch: Mapping[str, Any], scale: Any) -> tuple[Any, list[Any]]:
        if self.compiled_objective:
            keys = tuple(batch)
            tensors = [*p, *(batch[key] for key in keys), *([scale] if scale is not None else [])]
            signature = tuple((key, tuple(batch[key].shape), str(batch[key].dtype)) for key in keys)
            entry = self.objectives.get(signature)
            if entry is not None:  # compiled and run before: any error now is a real one
                (_, loss), grads = entry[0].run(entry[1], tensors)
                return loss, list(grads)
            try:
                traced = Traced(self.engine, self._flat_objective(keys, scale is not None), self.label)
                traced.prepare(tensors)
                entry = (traced, ms.value_and_grad(traced.compiled, grad_position=tuple(range(len(p)))))
                (_, loss), grads = traced.run(entry[1], tensors)
                self.objectives[signature] = entry
                return loss, list(grads)
            except Exception as error:
                problem = compile_failure(self.label, error, traced)
                if not self.engine.execution.fallback:
                    raise problem from None
                self.engine.fall_back(self.label, problem)
                self.compiled_objective = False
                self.description = f"pynative after a graph fallback ({problem})"
        params = dict(zip(self.names, p))
        _, loss, grads = self.engine.value_and_grad(lambda prm: self.step.objective(prm, batch, scale), params)
        return loss, [grads[n] for n in self.names]

    def _flat_objective(self, keys: tuple[str, ...], scaled: bool) -> Any:
        names, step, n = self.names, self.step, len(self.names)

        def objective(*flat: Any) -> tuple[Any, Any]:
            params = dict(zip(names, flat[:n]))
            # The batch is a graph input like the parameters, and the traced graph's backward would
            # compute its gradient too (for an image model, a Conv2DBackpropInput costing a quarter of
            # the step): stop_gradient marks it constant.
            batch = {key: ops.stop_gradient(t) for key, t in zip(keys, flat[n:n + len(keys)])}
            value, loss = step.objective(params, batch, flat[n + len(keys)] if scaled else None)
            # Two outputs, one differentiated: value_and_grad seeds every output, so the reported
            # loss leaves through stop_gradient.
            return value, ops.stop_gradient(loss)

        return objective

    def _compile_update(self, micro: int, groups: list[Any]) -> tuple[Traced, Any]:
        """The update as a traced function of six tuples, called from a ``mindspore.jit`` (AST)
        function: MindSpore runs a trace nested in an AST graph faster than the same trace on its
        own (measured on 2 busy cores: 741 AdamW ops on fresh inputs, 38 ms against 63 ms)."""
        names, step = self.names, self.step

        def update(p: Any, m: Any, v: Any, g: Any, losses: Any, hyper: Any) -> tuple[Any, ...]:
            n = len(names)
            grads = [dict(zip(names, g[j * n:(j + 1) * n])) for j in range(micro)]
            new_p, new_m, new_v, stats = step.update(dict(zip(names, p)), dict(zip(names, m)), dict(zip(names, v)),
                                                     grads, list(losses), hyper)
            return (*(new_p[x] for x in names), *(new_m[x] for x in names), *(new_v[x] for x in names), stats)

        traced = Traced(self.engine, update, f"{self.label} (update)", probe=False)
        traced.prepare(groups)
        inner = traced.compiled

        @ms.jit(jit_level=self.engine.execution.jit_level)
        def isthmus_update(p, m, v, g, losses, hyper):  # tuples, not *args: a starred call loses the trace
            return inner(p, m, v, g, losses, hyper)

        return traced, isthmus_update


__all__ = ["MindSporeStepRunner"]
