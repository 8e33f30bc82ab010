"""Records of a ``torch.nn.Module`` named by its own module paths, so two hosts line up with no
mapping file.

* ``--level layer``: every submodule's output (forward hooks) and the gradient flowing back into it
  (the output joins the tensors the engine's backward differentiates for), named by the module's
  path in ``named_modules()`` (``model.layers.0.mlp``); a module that runs twice gets ``@1``, ``@2``.
  The root module is not recorded: its output is the run's result.
* ``--level op``: also every aten call, through a ``TorchDispatchMode``, named
  ``<innermost module path>/<namespace.op>:<n>``, ``n`` counting that op's calls in that module (so
  the casts autocast inserts do not shift the names of the ops around them). Views, copies and the
  casts themselves are not recorded: they compute nothing a backend can get wrong.

The records go to a :class:`~isthmus.verify.capture.Capture`, which keeps them as it keeps a
kernel model's, so bundles, ``compare`` and the report read them unchanged.
"""

from __future__ import annotations

from typing import Any

from isthmus.verify.recording import CallInfo, LayerInfo

SKIPPED_OPS = frozenset({"aten._to_copy", "aten.copy_", "aten.clone", "aten.detach", "aten.alias", "aten.lift_fresh",
                         "aten._local_scalar_dense", "aten.empty", "aten.empty_strided", "aten.zeros_like",
                         "aten.ones_like", "aten.empty_like", "aten.fill_", "aten.zero_", "aten.arange",
                         "aten.scalar_tensor", "aten.lift_fresh_copy", "aten._unsafe_view"})


def tensors_of(value: Any) -> list[Any]:
    """The tensors in a module's output: a tensor, a tuple or list, a dict or a ``ModelOutput``."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # ModelOutput is a dict too
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_of(item)]
    return []


class ModuleProbe:
    """A context in which ``module``'s submodules (and, at ``level="op"``, its aten calls) report
    to ``capture``."""

    def __init__(self, module: Any, capture: Any, level: str) -> None:
        self.module, self.capture, self.level = module, capture, level
        self.paths = {id(sub): name for name, sub in module.named_modules() if name}
        self.index = 0
        self.stack: list[str] = []
        self.runs: dict[str, int] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.paused = False
        self.handles: list[Any] = []
        self.mode: Any = None

    # ---------------------------------------------------------------------------- entering
    def __enter__(self) -> ModuleProbe:
        for name, sub in self.module.named_modules():
            if name:
                self.handles.append(sub.register_forward_pre_hook(self._before))
                self.handles.append(sub.register_forward_hook(self._after, always_call=True))
        if self.level == "op":
            self.mode = _dispatch_mode(self)
            self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)
            self.mode = None
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ------------------------------------------------------------------------------- hooks
    def _before(self, sub: Any, args: Any) -> None:
        self.stack.append(self.paths[id(sub)])

    def _after(self, sub: Any, args: Any, output: Any) -> None:
        path = self.stack.pop() if self.stack else self.paths[id(sub)]
        runs = self.runs.get(path, 0)
        self.runs[path] = runs + 1
        name = path if not runs else f"{path}@{runs}"
        pieces = tensors_of(output)
        if not pieces:
            return
        code = type(sub).forward.__code__
        info = CallInfo(self._next(), type(sub).__name__, name, path, (*self.stack, path), code,
                        code.co_firstlineno)
        self.paused = True  # reading the output back runs ops that are not the model's
        try:
            self.capture.layer(LayerInfo(name, path, info.index, info), pieces[0] if len(pieces) == 1 else
                               tuple(pieces))
        finally:
            self.paused = False

    def _next(self) -> int:
        self.index += 1
        return self.index - 1

    # --------------------------------------------------------------------------------- ops
    def op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """One aten call returned: its record, unless it only moves or casts data."""
        import torch

        op = f"{func.namespace}.{func.overloadpacket.__name__}"
        if self.paused or op in SKIPPED_OPS or func.is_view:
            return
        outputs = tensors_of(out)
        if not outputs:
            return
        layer = self.stack[-1] if self.stack else ""
        n = self.counts.get((layer, op), 0)
        self.counts[(layer, op)] = n + 1
        code = self.op.__code__
        info = CallInfo(self._next(), op, f"{layer}/{op}:{n}" if layer else f"{op}:{n}", layer,
                        tuple(self.stack), code, code.co_firstlineno)
        inputs = tuple(t for t in tensors_of(list(args) + list(kwargs.values())) if isinstance(t, torch.Tensor))
        self.paused = True
        try:
            self.capture.call(info, inputs, {}, outputs[0] if len(outputs) == 1 else tuple(outputs))
        finally:
            self.paused = False


def _dispatch_mode(probe: ModuleProbe) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            probe.op(func, args, kwargs, out)
            return out

    return Calls()


__all__ = ["ModuleProbe", "SKIPPED_OPS", "tensors_of"]
