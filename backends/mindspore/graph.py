"""Kernel-level functions compiled by ``mindspore.jit(capture_mode="trace")``.

Models are Python over kernels, which MindSpore's AST compiler cannot parse (``try``, dataclasses,
dictionaries of parameters), so they are traced: the function runs once on real tensors and the
ops it dispatches become the graph. Three things make a trace faithful:

* **Flat tensor arguments.** ``mindspore.jit`` treats a tensor inside a tuple or dict argument as
  part of the cache key (it recompiles for new values), so every tensor is passed positionally;
  dictionaries and other Python values are rebuilt around them (:func:`flatten`).
* **Dropout masks as inputs.** The kernels draw masks on the host from the engine's numpy
  generator (restorable, the same on every device target). A trace would freeze the masks of its
  one run, so a recording run first notes each mask's shape and rate (:class:`MaskFeed`), and each
  call draws them from the generator in the same order PyNative would and passes them in.
* **No host reads.** Python that reads a tensor's value (``if loss > 0``, ``float(x)``) would be
  frozen into the graph with the value of the trace. Such a read is caught while the function is
  probed or traced and reported in one line that names the model, the file and line
  (:class:`GraphBreak`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# MindSpore comes through the engine module, which quiets its logging before it loads.
from isthmus.backends.mindspore.engine import ms, ops
from isthmus.errors import IsthmusError
_MINDSPORE_DIR = os.path.dirname(ms.__file__) + os.sep
HINT = ("write it with kernels (k.where, k.maximum), or set backend.options.mode=pynative "
        "(backend.options.fallback=true switches by itself)")


class GraphBreak(IsthmusError):
    """A function cannot run as a graph; the message names where and what to do."""


# --------------------------------------------------------------------------- host reads
_READS = {"__bool__": "bool(tensor): a Python branch on a tensor's value", "__float__": "float(tensor)",
          "__int__": "int(tensor)", "__index__": "a tensor used as a Python index", "item": "tensor.item()",
          "tolist": "tensor.tolist()", "asnumpy": "tensor.asnumpy()", "__array__": "numpy conversion of a tensor"}


@contextlib.contextmanager
def host_reads_forbidden(label: str) -> Iterator[None]:
    """Within: reading a tensor's value from code outside MindSpore raises :class:`GraphBreak`
    (MindSpore's own Python reads values while dispatching some ops; those pass)."""
    originals = {name: getattr(ms.Tensor, name) for name in _READS}

    def guarded(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(_MINDSPORE_DIR):
                return original(self, *args, **kwargs)
            where = f"{_short(caller.f_code.co_filename)}:{caller.f_lineno} in {caller.f_code.co_name}()"
            raise GraphBreak(f"{label} cannot run as a MindSpore graph: {where} reads a tensor's value "
                             f"({_READS[name]}); {HINT}")
        return read

    for name, original in originals.items():
        setattr(ms.Tensor, name, guarded(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(ms.Tensor, name, original)


def _short(path: str) -> str:
    parts = path.replace(os.sep, "/").split("/")
    for anchor in ("core", "backends", "plugins", "site-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return "/".join(parts[-2:])


# --------------------------------------------------------------------------- dropout masks
class MaskFeed:
    """The kernels' dropout masks while a function is probed (``masks`` None: note each mask's
    shape and rate, keep everything) or traced (hand out the mask inputs in order)."""

    def __init__(self, masks: Sequence[Any] | None = None) -> None:
        self.masks = None if masks is None else list(masks)
        self.plan: list[tuple[tuple[int, ...], float]] = []
        self.used = 0

    def mask(self, shape: tuple[int, ...], p: float) -> Any:
        if self.masks is None:
            self.plan.append((tuple(shape), float(p)))
            return ops.ones(tuple(shape), ms.bool_)
        if self.used >= len(self.masks) or tuple(self.masks[self.used].shape) != tuple(shape):
            raise RuntimeError(f"dropout mask {self.used} of shape {tuple(shape)} was not seen when the "
                               f"function was probed: its dropout calls depend on something besides shapes")
        self.used += 1
        return self.masks[self.used - 1]


def draw_masks(generator: np.random.Generator, plan: Sequence[tuple[tuple[int, ...], float]]) -> list[Any]:
    """The masks of ``plan`` from ``generator``, drawn as the dropout kernel draws them eagerly."""
    return [ms.Tensor(generator.random(shape) >= p) for shape, p in plan]


# --------------------------------------------------------------------------- arguments
def flatten(tree: Any) -> tuple[list[Any], Any]:
    """``(tensors, structure)``: the tensors of nested tuples, lists and dicts in order; the
    structure keeps every other value and is hashable when they are."""
    tensors: list[Any] = []

    def walk(node: Any) -> Any:
        if isinstance(node, ms.Tensor):
            tensors.append(node)
            return ("T", tuple(node.shape), str(node.dtype))
        if isinstance(node, dict):
            return ("D", tuple((key, walk(value)) for key, value in node.items()))
        if isinstance(node, (list, tuple)):
            return ("L" if isinstance(node, list) else "U", tuple(walk(value) for value in node))
        return ("V", node)

    return tensors, walk(tree)


def unflatten(structure: Any, tensors: Sequence[Any]) -> Any:
    """The inverse of :func:`flatten`."""
    source = iter(tensors)

    def build(node: Any) -> Any:
        kind, body = node[0], node[1]
        if kind == "T":
            return next(source)
        if kind == "D":
            return {key: build(value) for key, value in body}
        if kind in ("L", "U"):
            items = [build(value) for value in body]
            return items if kind == "L" else tuple(items)
        return body

    return build(structure)


# --------------------------------------------------------------------------- compiling
class _FramesWithSource:
    """``inspect`` for MindSpore's trace, whose ``stack()`` reads no source.

    The trace asks ``inspect.stack()`` for its callers at every op it records (for debug names)
    and fails ("'NoneType' object is not subscriptable") when a frame has no source lines, as code
    made by ``exec`` (dataclass methods, pytest's rewritten asserts) anywhere up the stack has none.
    Reading source for every frame at every op also makes a trace from a deep stack slow (minutes
    under pytest). File names and line numbers are all it uses; frames of code without a file
    (``<frozen runpy>``, ``<string>``) are left out, as MindSpore logs an error for each."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[Any]:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if not code.co_filename.startswith("<"):
                frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, [""], 0))
            frame = frame.f_back
        return frames


@contextlib.contextmanager
def _cheap_caller_lines() -> Iterator[None]:
    try:
        from mindspore.graph import jit_trace
    except ImportError:  # another MindSpore layout: nothing to adapt
        yield
        return
    original, jit_trace.inspect = jit_trace.inspect, _FramesWithSource()
    try:
        yield
    finally:
        jit_trace.inspect = original


def _tensor_text(self: Any) -> str:
    return "Tensor"  # not even the shape: reading it costs ~17 us, ~20 ms a small model's step


@contextlib.contextmanager
def _short_tensor_text() -> Iterator[None]:
    """Tensors print as ``Tensor`` within.

    MindSpore's trace builds ``logger.debug(f"... {args}")`` messages whether or not debug logging
    is on, formatting every argument's values: at every call of a traced function (~250 ms per
    small model's step, more than its kernels take) and at every op while tracing."""
    originals = ms.Tensor.__str__, ms.Tensor.__repr__
    ms.Tensor.__str__ = ms.Tensor.__repr__ = _tensor_text
    try:
        yield
    finally:
        ms.Tensor.__str__, ms.Tensor.__repr__ = originals


def _reset_trace_state() -> None:
    # A trace that raised leaves MindSpore's trace flag set, and every later trace would refuse to
    # start ("Should not use jit_block and jit_trace at the same time"): put it back.
    try:
        from mindspore.graph import jit_context, jit_trace
    except ImportError:  # another MindSpore layout: nothing we know to reset
        return
    jit_trace._using_trace = False
    jit_trace._trace_jit_context.compiled = False
    jit_context.set_jit_context(None)


class Traced:
    """``fn(*tensors)`` (tensors in, a tuple of tensors out) compiled by trace, with its dropout
    masks drawn per call. ``probe``: run ``fn`` eagerly once first (with the host-read guard and
    a recording mask feed, the generator untouched) to learn its masks."""

    def __init__(self, engine: Any, fn: Callable[..., Any], label: str, probe: bool = True) -> None:
        self.engine, self.fn, self.label, self.probe = engine, fn, label, probe
        self.plan: list[tuple[tuple[int, ...], float]] = []
        self.compiled: Callable[..., Any] | None = None
        self.probed = False  # the eager probe ran: a later error is the compiler's, not the model's
        self.checked = False

    def prepare(self, tensors: Sequence[Any]) -> None:
        """Probe ``fn`` on ``tensors`` (if asked) and build its ``mindspore.jit`` function."""
        if self.probe:
            feed = MaskFeed()
            with self.engine.feeding(feed), host_reads_forbidden(self.label):
                self.fn(*tensors)
            self.plan = feed.plan
        self.probed = True
        count, fn, engine = len(self.plan), self.fn, self.engine

        def isthmus_graph(*flat: Any) -> Any:
            # The name: MindSpore's trace mistakes a function named like a Tensor method for a
            # method of its first argument.
            with engine.feeding(MaskFeed(flat[len(flat) - count:] if count else [])):
                return fn(*flat[:len(flat) - count])

        self.compiled = ms.jit(isthmus_graph, capture_mode="trace", jit_level=engine.execution.jit_level)

    def masks(self) -> list[Any]:
        return draw_masks(self.engine.generator, self.plan)

    def run(self, call: Callable[..., Any], tensors: Sequence[Any]) -> Any:
        """``call(*tensors, *masks)``, where ``call`` wraps :attr:`compiled` (``value_and_grad``
        of it, or itself); the first call traces, under the host-read guard."""
        if self.checked:
            with _short_tensor_text():
                return call(*tensors, *self.masks())
        try:
            with host_reads_forbidden(self.label), _cheap_caller_lines(), _short_tensor_text():
                out = call(*tensors, *self.masks())
        except BaseException:
            _reset_trace_state()
            raise
        self.checked = True
        return out


def compile_failure(label: str, error: BaseException, traced: Traced) -> GraphBreak:
    """``error``, raised while ``traced`` (of ``label``) was probed or compiled, as one line; an
    error of the eager probe other than a host read is the function's own and is raised as is."""
    if isinstance(error, GraphBreak):
        return error
    if not traced.probed:
        raise error
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return GraphBreak(f"{label} cannot run as a MindSpore graph: {type(error).__name__}: {first[:240]}; {HINT}")


class GraphFunction:
    """``fn(*args, **kwargs)`` compiled per argument signature (shapes, dtypes, Python values);
    what :meth:`MindSporeEngine.compile_step` returns in graph mode. Arguments and results are any
    nesting of tuples, lists and dicts around tensors."""

    def __init__(self, engine: Any, fn: Callable[..., Any], owner: str, label: str) -> None:
        self.engine, self.fn, self.owner, self.label = engine, fn, owner, label
        self.entries: dict[Any, tuple[Traced, list[Any]]] = {}
        self.eager = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager or self.engine.feeding_now or self.owner in self.engine.fell_back:
            # (inside another trace, that one records the ops; a model that fell back stays eager)
            return self.fn(*args, **kwargs)
        tensors, structure = flatten((args, kwargs))
        try:
            hash(structure)
        except TypeError:  # an unhashable Python argument: no signature to compile for
            return self.fn(*args, **kwargs)
        key = structure
        entry = self.entries.get(key)
        if entry is None:
            output_structure: list[Any] = []

            def flat_fn(*flat: Any) -> tuple[Any, ...]:
                call_args, call_kwargs = unflatten(structure, flat)
                out_tensors, out_structure = flatten(self.fn(*call_args, **call_kwargs))
                output_structure[:] = [out_structure]
                return tuple(out_tensors)

            entry = (Traced(self.engine, flat_fn, self.owner), output_structure)
            try:
                entry[0].prepare(tensors)
                flat_out = entry[0].run(entry[0].compiled, tensors)
            except Exception as error:
                return self._fall_back(compile_failure(self.owner, error, entry[0]), args, kwargs)
            self.entries[key] = entry
        else:
            flat_out = entry[0].run(entry[0].compiled, tensors)
        if not isinstance(flat_out, (tuple, list)):
            flat_out = (flat_out,)
        return unflatten(entry[1][0], flat_out)

    def _fall_back(self, problem: GraphBreak, args: Any, kwargs: Any) -> Any:
        if not self.engine.execution.fallback:
            raise problem
        self.engine.fall_back(self.owner, problem)
        self.eager = True
        return self.fn(*args, **kwargs)


__all__ = ["GraphBreak", "GraphFunction", "HINT", "MaskFeed", "Traced", "compile_failure", "draw_masks", "flatten",
           "host_reads_forbidden", "unflatten"]
