"""Kernel calls named the same way on every engine.

A :class:`Recording` wraps a kernel set and names each call its model makes, so a dump taken on one
engine and the float64 reference computed elsewhere line up record for record:

* the **layer** of a call is the innermost :class:`~isthmus.nn.params.Scope` prefix on the Python
  call stack between the model's entry and the kernel call (``vision.blocks.0.attn.qkv`` inside
  :func:`isthmus.nn.layers.linear`, ``vision.blocks.0.attn`` for the attention op itself; in a frame
  holding several scopes, the one bound last); the call also runs in each dotted ancestor of that
  layer (``vision.blocks.0``, ``vision.blocks``, ``vision``). Model code is the same Python on
  every engine, so the names are too;
* the **op record** of a call is ``<layer>/<op>:<n>``, ``n`` counting that op's calls in that layer
  (``<op>:<n>`` at the top of the model);
* a **layer record** is the output of the last call made while the layer was on the stack, which is
  the value a layer function returns; a layer that runs twice gets ``@1``, ``@2``.

``shape`` and ``dtype`` calls read metadata only: they are neither recorded nor counted.
"""

from __future__ import annotations

import os
import sys
import weakref
from types import FrameType
from typing import Any, Callable, NamedTuple, Protocol

from isthmus.kernels.interface import OPS
from isthmus.kernels.routing import KernelSet
from isthmus.nn.params import Scope

METADATA_OPS = frozenset({"shape", "dtype"})
CREATION_OPS = frozenset({"asarray", "zeros", "ones", "full", "arange"})


class CallInfo(NamedTuple):
    """One recorded kernel call: its position, op, canonical name and where the model made it."""

    index: int
    op: str
    name: str
    layer: str
    layers: tuple[str, ...]  # the layers it runs in, outermost first
    code: Any  # the calling code object and line, for :attr:`where`
    line: int

    @property
    def where(self) -> str:
        """``function (file.py:line)`` of the model code that made the call."""
        code = self.code
        places = _code_entry(code)[1]
        found = places.get(self.line)
        if found is None:
            found = places[self.line] = f"{code.co_name} ({os.path.basename(code.co_filename)}:{self.line})"
        return found


_ANCESTORS: dict[str, tuple[str, ...]] = {}
"""A scope prefix's chain of layers (``a``, ``a.b``, ``a.b.c``), built once per process: one tuple
per layer path, so a call's layers equal the previous call's exactly when they are the same object."""

_CODES: dict[int, tuple[Any, dict[int, str], dict[int, int]]] = {}
"""Per code object of model code: its ``where`` by line, and its line by instruction offset (a call
keeps its frame's ``f_lasti``: ``f_lineno`` walks the line table from the start every time, 0.9 us a
call here). Keyed by ``id(code)``, the entry holding the code (so the id stays its own): hashing a
code object hashes its bytecode, constants and names every time (2 us a record here)."""

_CACHE_LIMIT = 1 << 16


def _code_entry(code: Any) -> tuple[Any, dict[int, str], dict[int, int]]:
    """``code``'s entry in :data:`_CODES`, made on first use."""
    entry = _CODES.get(id(code))
    if entry is None or entry[0] is not code:
        entry = _remember(_CODES, id(code), (code, {}, {}))
    return entry


def _line(code: Any, offset: int) -> int:
    """The source line of the instruction at ``offset`` (a frame's ``f_lasti``) in ``code``."""
    lines = _code_entry(code)[2]
    line = lines.get(offset)
    if line is None:
        line = next((found for start, end, found in code.co_lines() if start <= offset < end and found is not None),
                    code.co_firstlineno)
        lines[offset] = line
    return line


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """``cache[key] = value``, the cache emptied first at :data:`_CACHE_LIMIT` entries (code made at
    run time, by exec, must not grow it forever)."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


_IDLE: "weakref.WeakKeyDictionary[KernelSet, Recording]" = weakref.WeakKeyDictionary()
"""A recording whose run has ended, by its kernel set (see :meth:`Recording.for_kernels`). It
holds no reference to the set, so the entry goes with the set."""


class LayerInfo(NamedTuple):
    """One run of a layer: its record name and the call whose output the layer returned."""

    name: str
    layer: str
    first: int
    last: CallInfo


class Sink(Protocol):
    """What a :class:`Recording` reports to."""

    def call(self, info: CallInfo, args: tuple, kwargs: dict, out: Any) -> None:
        """Every recorded call, as it returns."""

    def layer(self, info: LayerInfo, out: Any) -> None:
        """A layer's run has ended; ``out`` is the output of its last call."""

    # Optional: ``wants_call`` (a method or attribute), asked after each call when not None. A
    # sink that has it gets :meth:`call` only when it answers true, and the :class:`CallInfo` of
    # the other calls is never built (a layer-level dump needs the last call of each layer only).


_make = tuple.__new__


def op_name(layer: str, op: str, n: int) -> str:
    """The canonical name of the ``n``-th call of ``op`` in ``layer``."""
    return f"{layer}/{op}:{n}" if layer else f"{op}:{n}"


class _Wrapped(KernelSet):
    """A copy of a kernel set whose ops (all but :data:`METADATA_OPS`) are wrapped on first use:
    a model calls a few of the ops."""

    _wrap_op: Callable[[str, Callable[..., Any]], Callable[..., Any]]

    @classmethod
    def of(cls, kernels: KernelSet, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> "_Wrapped":
        copy = object.__new__(cls)
        copy.__dict__.update(kernels.__dict__)
        copy._originals = {op: getattr(kernels, op) for op in OPS if op not in METADATA_OPS}
        for op in copy._originals:
            copy.__dict__.pop(op, None)
        copy._wrap_op = wrap
        return copy

    def __getattr__(self, op: str) -> Callable[..., Any]:
        # Only reached for an attribute not set yet: an op's first use.
        originals = self.__dict__.get("_originals", {})
        if op not in originals:
            raise AttributeError(f"{type(self).__name__} has no attribute '{op}'")
        wrapped = self._wrap_op(op, originals[op])
        setattr(self, op, wrapped)
        return wrapped


def _scopes(frame: FrameType | None, stop: FrameType | None) -> tuple[str, ...]:
    """The innermost scope on the stack below ``stop`` and its dotted ancestors, outermost first."""
    while frame is not None and frame is not stop:
        # The frame's latest-bound Scope (locals come in the order the code first binds them):
        # in straight-line model code, the one the current part of the code reads.
        for value in reversed(frame.f_locals.values()):
            if type(value) is Scope and value.prefix:
                prefix = value.prefix
                cached = _ANCESTORS.get(prefix)
                if cached is None:
                    parts = prefix.split(".")
                    cached = _remember(_ANCESTORS, prefix, tuple(".".join(parts[:i]) for i in range(1, len(parts) + 1)))
                return cached
        frame = frame.f_back
    return ()


class Recording:
    """A kernel set (:attr:`kernels`) that names every call and reports it to ``sink``.

    Call :meth:`begin` in the function that calls the model (frames above it are not searched for
    scopes) and :meth:`end` when the model has returned, which closes the layers still open; calls
    after that are not recorded. :attr:`index` counts the calls of the run. A dump that runs many
    passes takes each one's recording from :meth:`for_kernels`.
    """

    def __init__(self, kernels: KernelSet, sink: Sink) -> None:
        self._kernel_set = weakref.ref(kernels)  # not the set itself: see :meth:`for_kernels`
        self._attach(sink)
        self._counts: list[dict[str, int]] = []  # each wrapped op's calls per layer, in this run
        self.kernels = _Wrapped.of(kernels, self._wrap)
        self.begin()

    @classmethod
    def for_kernels(cls, kernels: KernelSet, sink: Sink) -> "Recording":
        """A recording of ``kernels`` reporting to ``sink``: one whose run on the same kernel set
        has ended, where there is one, else a new one. Its wrapped ops are kept: made again for
        every pass, their closures were 229 of the 928 containers a layer-level pass of the demo
        model had made by its end, and those set the garbage collector off about once a pass."""
        recording = _IDLE.pop(kernels, None)
        if recording is None:
            return cls(kernels, sink)
        recording._attach(sink)
        recording.begin()
        return recording

    def _attach(self, sink: Sink) -> None:
        self.sink: Sink | None = sink
        self._wants: Callable[[], bool] | None = getattr(sink, "wants_call", None)
        self._ended_sink: Callable[[], Sink | None] | None = None

    def begin(self) -> None:
        """Start a run: counters reset; scopes are searched below the caller's frame. After
        :meth:`end`, the same recording runs again for the same sink while its caller keeps it
        (an engine may call the function it differentiates more than once)."""
        if self.sink is None:
            sink = self._ended_sink() if self._ended_sink is not None else None
            if sink is None:
                raise RuntimeError("this recording's run ended and its sink is gone: take a new one "
                                   "with Recording.for_kernels(kernels, sink)")
            self._attach(sink)
        kernels = self._kernel_set()
        if kernels is not None and _IDLE.get(kernels) is self:  # running again: not to be handed out
            del _IDLE[kernels]
        self._stop: FrameType | None = sys._getframe(1)
        self.index = 0
        for counts in self._counts:
            counts.clear()
        self._layer_runs: dict[str, int] = {}
        self._open: dict[str, tuple[str, int]] = {}  # layer -> (record name, first call)
        self._layers: tuple[str, ...] = ()
        # The previous call, as (index, op, n, layers, code, offset), its output, and its CallInfo once built.
        self._previous: tuple[int, str, int, tuple[str, ...], Any, int] | None = None
        self._previous_out: Any = None
        self._previous_info: CallInfo | None = None

    def end(self) -> None:
        """Close every open layer (innermost first), and let go of the caller's frame and the last
        output: held past the run, they would tie the model's tensors into a reference cycle that
        only the garbage collector frees (memory torch could not reuse in the next pass)."""
        self._enter(())
        self._stop = None
        self._previous, self._previous_out, self._previous_info = None, None, None
        # The sink (and all it kept) is the caller's now, held here weakly for a begin() to come;
        # the wrapped ops wait for the next run.
        sink = self.sink
        try:
            self._ended_sink = weakref.ref(sink)  # type: ignore[arg-type]
        except TypeError:  # a sink that takes no weak reference stays held
            self._ended_sink = lambda: sink
        self.sink, self._wants = None, None
        kernels = self._kernel_set()
        if kernels is not None:
            _IDLE[kernels] = self

    # ------------------------------------------------------------------------------ internals
    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        getframe = sys._getframe
        # This op's calls in each layer (a chain's last entry), one dict per op: no key built per call.
        counts: dict[str, int] = {}
        self._counts.append(counts)

        def call(*args: Any, **kwargs: Any) -> Any:
            sink = self.sink
            if sink is None:  # the run has ended (a recomputing backward may still call): not recorded
                return fn(*args, **kwargs)
            frame = getframe(1)
            layers = _scopes(frame, self._stop)
            out = fn(*args, **kwargs)
            index = self.index
            self.index = index + 1
            layer = layers[-1] if layers else ""
            n = counts.get(layer, 0)
            counts[layer] = n + 1
            if layers is not self._layers:  # scopes' tuples are shared: identity is equality here
                self._enter(layers, index)
            self._previous = (index, op, n, layers, frame.f_code, frame.f_lasti)
            self._previous_out = out
            self._previous_info = None
            wants = self._wants
            if wants is None or wants():
                info = self._previous_info = self._info(self._previous)
                sink.call(info, args, kwargs, out)
            return out

        call.__name__ = op
        return call

    @staticmethod
    def _info(raw: tuple[int, str, int, tuple[str, ...], Any, int]) -> CallInfo:
        index, op, n, layers, code, offset = raw
        layer = layers[-1] if layers else ""
        line = _line(code, offset)
        # tuple.__new__ runs no Python frame; CallInfo(...) runs the namedtuple's __new__.
        return _make(CallInfo, (index, op, op_name(layer, op, n), layer, layers, code, line))

    def _enter(self, layers: tuple[str, ...], first: int = -1) -> None:
        """The calls now run in ``layers``: close the open layers not among them (their last call
        is the previous one, which was still inside them), innermost first, and open the new ones.
        Both are chains of one layer's ancestors, so they differ past their common start only."""
        old = self._layers
        same = min(len(old), len(layers))
        while same and old[same - 1] != layers[same - 1]:  # chains agree up to their deepest common layer
            same -= 1
        opened = self._open
        if len(old) > same:
            last = self._previous_info
            if last is None and self._previous is not None:
                last = self._previous_info = self._info(self._previous)
            out, report = self._previous_out, self.sink.layer
            for path in reversed(old[same:]):
                name, start = opened.pop(path)
                if last is not None:
                    report(_make(LayerInfo, (name, path, start, last)), out)
        if len(layers) > same:
            runs = self._layer_runs
            for path in layers[same:]:
                n = runs.get(path, 0)
                runs[path] = n + 1
                opened[path] = (f"{path}@{n}" if n else path, first)
        self._layers = layers


__all__ = ["CREATION_OPS", "CallInfo", "LayerInfo", "METADATA_OPS", "Recording", "Sink", "op_name"]
