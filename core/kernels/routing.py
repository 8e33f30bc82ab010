"""Kernel routing: assemble one backend's kernel set from its engine table plus per-op overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping


@dataclass(frozen=True)
class KernelRoute:
    """A per-op override contributed through the ``register_kernels`` hook.

    ``impl`` has exactly the signature of the kernel op it replaces. ``available`` is checked when
    the kernel set is built; a route whose check fails is skipped and the engine's op serves.
    """

    backend: str
    op: str
    impl: Callable[..., Any]
    engine: str | None = None
    available: Callable[[], bool] | None = None
    plugin: str = ""


def describe(fn: Callable[..., Any]) -> str:
    """A stable human name for an implementation: ``module.qualname``."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


def _available(route: KernelRoute) -> bool:
    """A route's own availability check; one that raises counts as unavailable, so a plugin's
    broken check falls back to the engine's op instead of breaking the backend."""
    try:
        return bool(route.available())  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - a plugin's check: the engine's op serves instead
        return False


class KernelSet:
    """The ops a model calls (``k.softmax(x)``), each bound to the implementation that serves it.

    ``sources`` maps each op to ``module.qualname`` of its implementation and ``routed`` names the
    plugin that overrode it, so ``isthmus kernels`` can say who serves what.
    """

    def __init__(
        self,
        backend: str,
        engine: str,
        table: Mapping[str, Callable[..., Any]],
        routes: Iterable[KernelRoute] = (),
        required: Iterable[str] | None = None,
    ) -> None:
        if required is None:
            from isthmus.kernels.interface import OPS

            required = OPS
        wanted = tuple(required)
        missing = [op for op in wanted if op not in table]
        if missing:
            raise ValueError(
                f"kernel table of backend '{backend}' (engine {engine}) lacks ops: {', '.join(missing)}"
            )
        ops: dict[str, Callable[..., Any]] = dict(table)
        routed: dict[str, str] = {}
        for route in routes:
            if route.backend != backend or (route.engine and route.engine != engine):
                continue
            if route.op not in ops:
                raise ValueError(
                    f"plugin '{route.plugin}' routes unknown op '{route.op}' on backend '{backend}'; "
                    f"known ops: {', '.join(sorted(ops))}"
                )
            if route.available is not None and not _available(route):
                continue
            ops[route.op] = route.impl
            routed[route.op] = route.plugin
        self.backend = backend
        self.engine = engine
        self.routed = routed
        self.sources = {op: describe(fn) for op, fn in ops.items()}
        self._ops = ops
        for op, fn in ops.items():
            setattr(self, op, fn)

    def __contains__(self, op: str) -> bool:
        return op in self._ops

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._ops))

    def __repr__(self) -> str:
        return f"KernelSet(backend={self.backend!r}, engine={self.engine!r}, ops={len(self._ops)})"
