"""What a dump keeps of each recorded call: statistics, the tensor or its MD5, the gradient that
flows back into it, and the dtype changes, fallbacks and host placements seen at the kernel
boundary.

Statistics (:mod:`isthmus.verify.statistics`) are computed in float64 on the host: one row per
record in a float64 matrix, so a stats-mode bundle stays small and keeps every digit of every
statistic. A capture taken with ``deferred=True`` reads them in one batch when the pass ends (or
when :data:`DEFER_ELEMENTS` are waiting), not between the model's kernel calls, straight from the
engine's host memory where it offers it (``Engine.host_memory``) and through ``host_view``
otherwise: the same numbers, for less time. That is only right where nothing writes into a tensor
after it is recorded, which the kernel contract guarantees (kernels return new tensors) and a
module's in-place ops (``ReLU(inplace=True)``) do not.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import numpy as np

from isthmus.kernels.interface import FLOAT_DTYPES
from isthmus.verify.recording import CREATION_OPS, CallInfo, LayerInfo
from isthmus.verify.statistics import STATS, stats, stats_of

LEVELS = ("model", "layer", "op")
MODES = ("stats", "tensors", "md5")
FLOATS = frozenset(FLOAT_DTYPES)
NO_DTYPE_RULE = frozenset({"cast", "global_norm", "adamw_update", *CREATION_OPS})
"""Ops whose output dtype is set by an argument or by the contract, not by their inputs."""

DEFER_ELEMENTS = 1 << 22
"""Elements whose statistics a deferred capture lets wait (4M: 16 MB of float32 kept alive) before
it reads them."""


def widens(source: str, target: str) -> bool:
    """Whether every ``source`` value is exact in ``target`` (float16/bfloat16 -> float32, any -> float64)."""
    return source == target or target == "float64" or (target == "float32" and source in ("float16", "bfloat16"))


_NOT_TENSORS = (bool, int, float, complex, str, bytes, type(None), dict, np.generic)


def _flat(value: Any) -> list[Any]:
    """The tensors in ``value`` (an output, or a call's arguments), lists and tuples looked into."""
    if not isinstance(value, (list, tuple)):
        return [] if isinstance(value, _NOT_TENSORS) else [value]
    found = []
    for item in value:
        if isinstance(item, (list, tuple)):
            found += _flat(item)
        elif not isinstance(item, _NOT_TENSORS):
            found.append(item)
    return found


_NOTHING: tuple[()] = ()

_DATA = ("dtype", "shape", "row", "tensor", "md5")
"""A record's fields that describe its tensor (the rest say where it was taken)."""


class _Tap:
    """Where the gradient of one recorded output goes: its backward record (one small object per
    tap, where a closure made six)."""

    __slots__ = ("capture", "call", "name", "shape")

    def __init__(self, capture: "Capture", call: CallInfo, name: str, shape: list[int]) -> None:
        self.capture, self.call, self.name, self.shape = capture, call, name, shape

    def __call__(self, grad: Any) -> None:
        if grad is None:  # an engine may report "no gradient" as None
            return
        call = self.call
        record = {"name": self.name, "op": call.op, "layer": call.layer, "call": call.index}
        # A gradient has its tensor's shape.
        self.capture._keep("backward", self.name, grad, record, self.shape)
        self.capture.backward.append(record)


class Capture:
    """A :class:`~isthmus.verify.recording.Sink` that keeps one run's records.

    ``level``: ``model`` (no records), ``layer`` (each layer's output) or ``op`` (every call's
    output, and the layer records pointing at them). ``mode``: ``stats`` (the
    :data:`~isthmus.verify.statistics.STATS` row), ``tensors`` (also the tensor) or ``md5`` (also the
    MD5 of its bytes). Backward records come from
    ``engine.tap`` where the engine offers it; ``key`` prefixes the stored tensors' keys.
    ``deferred``: stats-mode statistics are read in batches (see the module's note).
    """

    def __init__(self, engine: Any, kernels: Any, level: str, mode: str, key: str,
                 events: Any = None, backward: bool = True, dtype: str = "", deferred: bool = False) -> None:
        self.engine, self.dtype_of, self.shape_of = engine, kernels.dtype, kernels.shape
        self.level, self.mode, self.key = level, mode, key
        self.device = getattr(engine, "device", "")
        self.kernel_events = events
        self.backward_wanted = backward
        self.dtype = dtype
        self.forward: list[dict[str, Any]] = []
        self.backward: list[dict[str, Any]] = []
        # Per direction: the rows so far, and the statistics read, as (row numbers, their rows) blocks.
        self._row_count = {"forward": 0, "backward": 0}
        self._blocks: dict[str, list[tuple[Any, np.ndarray]]] = {"forward": [], "backward": []}
        self.tensors: dict[str, np.ndarray] = {}
        self.events: list[dict[str, Any]] = []
        self.calls = 0
        self.taps = 0
        # The first record of each output already kept, by its call (and position, in a call
        # returning several): a later record of the same output shares its data.
        self._done: dict[int | tuple[int, int], dict[str, Any]] = {}
        self.deferred = deferred and mode == "stats"
        # Per direction, the rows waiting for their statistics and their tensors (two lists, not a
        # list of pairs: a pass makes a few hundred records, and every container it keeps counts
        # towards the next run of the garbage collector).
        self._waiting: dict[str, tuple[list[int], list[Any]]] = {"forward": ([], []), "backward": ([], [])}
        self._waiting_elements = 0
        self._every_call = level == "op"
        self._off_host = bool(self.device and self.device != "cpu")  # where _layer_checks looks for host outputs
        # The recording asks this after each call (see Sink): whether the call needs :meth:`call`.
        # At op level every call does (None); elsewhere only one that left kernel notes, which the
        # notes list's own len answers without running Python code (the layer records come
        # through :meth:`layer`).
        self.wants_call: Callable[[], int] | None = (
            None if self._every_call else events.items.__len__ if events is not None else _NOTHING.__len__)

    # ---------------------------------------------------------------------------- the sink
    def call(self, info: CallInfo, args: tuple, kwargs: dict, out: Any) -> None:
        """A call: its kernels' notes; at op level, the boundary checks and its record (at layer
        level the checks run on the recorded outputs only, which keeps the pass cheap)."""
        self.calls += 1
        if self.kernel_events is not None and self.kernel_events.items:
            self._notes(info)
        if self._every_call:
            self._boundary(info, args, kwargs, out)
            self._record(info, info.name, "op", out)

    def layer(self, info: LayerInfo, out: Any) -> None:
        """A layer's run ended: its record (pointing at its last call's data)."""
        if self.level != "model":
            self._record(info.last, info.name, "layer", out, layer=info.layer)

    # -------------------------------------------------------------------------- internals
    def _record(self, call: CallInfo, name: str, kind: str, out: Any, layer: str | None = None) -> None:
        layer = call.layer if layer is None else layer
        if isinstance(out, (list, tuple)):
            pieces = _flat(out)
            several = len(pieces) > 1
            for i, tensor in enumerate(pieces):
                suffix = f".{i}" if several else ""
                self._record_one(call, name + suffix, kind, tensor, layer, (call.index, i) if several else call.index,
                                 suffix)
        elif not isinstance(out, _NOT_TENSORS):  # one tensor: most calls
            self._record_one(call, name, kind, out, layer, call.index, "")

    def _record_one(self, call: CallInfo, name: str, kind: str, tensor: Any, layer: str, slot: int | tuple[int, int],
                    suffix: str) -> None:
        record = {"name": name, "kind": kind, "op": call.op, "layer": layer, "call": call.index, "where": call.where}
        first = self._done.get(slot)
        if first is not None:  # this output is recorded already: share its data
            for field in _DATA:
                if field in first:
                    record[field] = first[field]
            self.forward.append(record)
            return
        self._done[slot] = record
        key = call.name + suffix
        self._keep("forward", key, tensor, record)
        self.forward.append(record)
        dtype = record["dtype"]
        if not self._every_call and (self._off_host or dtype != self.dtype):  # else it finds nothing
            self._layer_checks(call, tensor, dtype)
        if self.backward_wanted and dtype in FLOATS and self.engine.tap(tensor, _Tap(self, call, key, record["shape"])):
            self.taps += 1

    def _keep(self, direction: str, name: str, tensor: Any, record: dict[str, Any],
              shape: list[int] | None = None) -> None:
        """The record's data (:data:`_DATA`) into ``record`` (``shape``: the tensor's, where known already)."""
        record["dtype"] = self.dtype_of(tensor)
        row = self._row_count[direction]
        self._row_count[direction] = row + 1
        if self.deferred:
            shape = list(self.shape_of(tensor)) if shape is None else shape
            record["shape"], record["row"] = shape, row
            rows_waiting, tensors_waiting = self._waiting[direction]
            rows_waiting.append(row)
            tensors_waiting.append(tensor)
            self._waiting_elements += math.prod(shape)
            if self._waiting_elements >= DEFER_ELEMENTS:
                self._read_waiting()
            return
        # Statistics and hashes are taken now: a view will do. Kept tensors need their own copy.
        host = self.engine.to_numpy(tensor) if self.mode == "tensors" else self.engine.host_view(tensor)
        self._blocks[direction].append(([row], stats(host)[None]))
        record["shape"], record["row"] = list(host.shape), row
        if self.mode == "tensors":
            key = f"{self.key}/{direction}/{name}"
            self.tensors[key] = host
            record["tensor"] = key
        elif self.mode == "md5":
            record["md5"] = hashlib.md5(np.ascontiguousarray(host).tobytes()).hexdigest()

    def _read_waiting(self) -> None:
        """The waiting records' statistics, both directions in one read."""
        (forward_rows, forward), (backward_rows, backward) = self._waiting["forward"], self._waiting["backward"]
        if forward_rows or backward_rows:
            table = stats_of(forward + backward, self.engine.host_memory, self.engine.host_view)
            if forward_rows:
                self._blocks["forward"].append((forward_rows[:], table[:len(forward_rows)]))
            if backward_rows:
                self._blocks["backward"].append((backward_rows[:], table[len(forward_rows):]))
            for waiting in (forward_rows, forward, backward_rows, backward):
                waiting.clear()
        self._waiting_elements = 0

    def _notes(self, info: CallInfo) -> None:
        for kind, detail in self.kernel_events.drain():
            self.events.append({"kind": kind, "call": info.index, "name": info.name, "op": info.op,
                                "layer": info.layer, "detail": detail})

    def _layer_checks(self, call: CallInfo, tensor: Any, produced: str) -> None:
        """At layer level: a layer output in a float dtype that cannot hold the run's, or on the host."""
        if self.dtype and produced in FLOATS and produced != self.dtype and not widens(self.dtype, produced):
            self.events.append({"kind": "downcast", "call": call.index, "name": call.name, "op": call.op,
                                "layer": call.layer, "detail": f"{produced} output in a {self.dtype} run"})
        if self.device and self.device != "cpu":
            where = self.engine.placement(tensor)
            if where and where != self.device:
                self.events.append({"kind": "host", "call": call.index, "name": call.name, "op": call.op,
                                    "layer": call.layer, "detail": f"output on {where}, engine device {self.device}"})

    def _boundary(self, info: CallInfo, args: tuple, kwargs: dict, out: Any) -> None:
        outputs = _flat(out)
        if self.device and self.device != "cpu":  # on a host device nothing runs "on the host instead"
            for tensor in outputs:
                where = self.engine.placement(tensor)
                if where and where != self.device:
                    self.events.append({"kind": "host", "call": info.index, "name": info.name, "op": info.op,
                                        "layer": info.layer, "detail": f"output on {where}, engine device {self.device}"})
                    break
        if info.op in NO_DTYPE_RULE:
            return
        inputs = {self.dtype_of(t) for t in _flat(args)}
        if kwargs:
            inputs.update(self.dtype_of(t) for t in _flat(list(kwargs.values())))
        inputs &= FLOATS
        if len(inputs) != 1:
            return
        source = inputs.pop()
        for tensor in outputs:
            produced = self.dtype_of(tensor)
            if produced != source and produced in FLOATS:
                kind = "upcast" if widens(source, produced) else "downcast"
                self.events.append({"kind": kind, "call": info.index, "name": info.name, "op": info.op,
                                    "layer": info.layer, "detail": f"{source} inputs, {produced} output"})
                break

    # ---------------------------------------------------------------------------- results
    def matrices(self) -> dict[str, np.ndarray]:
        """The stats rows as ``{direction: (n, len(STATS)) float64}`` (the waiting ones read first)."""
        self._read_waiting()
        found = {}
        for direction, blocks in self._blocks.items():
            matrix = found[direction] = np.empty((self._row_count[direction], len(STATS)))
            for rows, block in blocks:
                matrix[rows] = block
        return found


__all__ = ["Capture", "LEVELS", "MODES", "widens"]
